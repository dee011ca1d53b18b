"""Transfer syntaxes and DICOM pixel decoding: the project's one DICOM pixel decoder.

Everything that depends on how pixel data are encoded lives here: which transfer
syntaxes are valid, compressed or lossy, which decoder package reads them, and
``decode_stored_values``, which turns one file's pixel data into stored values
(high bits masked, sign-extended). Rescale to HU is the caller's step.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from corona_ct.pipeline.errors import DecoderMissingError, InputError
from corona_ct.pipeline.ingest.deid import clean_text, display_path

if TYPE_CHECKING:
    from corona_ct.pipeline.ingest.dicom.header import SliceHeader

# Decoder package to install per compressed transfer syntax (pydicom's plugin names).
_OPENJPEG = "pylibjpeg-openjpeg"
_LIBJPEG = "pylibjpeg-libjpeg"
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.90": _OPENJPEG,  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": _OPENJPEG,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _OPENJPEG,  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": _OPENJPEG,  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": _OPENJPEG,  # HTJ2K
    "1.2.840.10008.1.2.4.50": _LIBJPEG,  # JPEG baseline
    "1.2.840.10008.1.2.4.51": _LIBJPEG,  # JPEG extended
    "1.2.840.10008.1.2.4.57": _LIBJPEG,  # JPEG lossless
    "1.2.840.10008.1.2.4.70": _LIBJPEG,  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": _LIBJPEG,  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": _LIBJPEG,  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",  # RLE lossless
}
_LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.203",
}
#: Everything pydicom or numpy may raise on a damaged or hostile file.
READ_ERRORS = (
    InvalidDicomError,
    OSError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    NotImplementedError,
    RuntimeError,
    struct.error,
)


class _CollectRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def pydicom_log_captured() -> Iterator[list[str]]:
    """Collect what pydicom logs (instead of one stderr line per file); yields the messages' list."""
    logger = logging.getLogger("pydicom")
    handler = _CollectRecords()
    saved_handlers, saved_propagate = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [handler], False
    try:
        yield handler.messages
    finally:
        logger.handlers, logger.propagate = saved_handlers, saved_propagate


# --------------------------------------------------------------------------- transfer syntaxes


def _uid(value: str) -> UID:
    """``value`` as a pydicom UID, without pydicom's warning for a malformed one (headers are hostile)."""
    return UID(value, validation_mode=pydicom.config.IGNORE)


def is_transfer_syntax(uid: str) -> bool:
    """True when ``uid`` is a DICOM transfer syntax pydicom knows (not another UID or garbage)."""
    return bool(uid) and _uid(uid).is_transfer_syntax


def is_encapsulated(uid: str) -> bool:
    """True when pixel data under this syntax are compressed frames that need a decoder."""
    return is_transfer_syntax(uid) and _uid(uid).is_compressed


def native_size_known(uid: str) -> bool:
    """True when the pixel data's byte count follows from the header (native, not deflated)."""
    return is_transfer_syntax(uid) and not _uid(uid).is_compressed and uid != DeflatedExplicitVRLittleEndian


def is_lossy(uid: str) -> bool:
    """True for lossy compression (HU values approximate)."""
    return uid in _LOSSY_SYNTAXES


def transfer_syntax_name(uid: str) -> str:
    """Readable name of a transfer syntax UID (the cleaned UID when unknown)."""
    name = _uid(uid).name if uid else ""
    return clean_text(name if name and name != uid else uid or "unknown", max_length=80)


def decoder_available(transfer_syntax_uid: str) -> bool:
    """True when pydicom has a working decoder (pylibjpeg plugin, GDCM, Pillow) for the syntax."""
    if not is_transfer_syntax(transfer_syntax_uid):
        return False
    if not is_encapsulated(transfer_syntax_uid):
        return True
    try:
        return bool(pydicom.pixels.get_decoder(_uid(transfer_syntax_uid)).is_available)
    except NotImplementedError:
        return False


def require_transfer_syntax(uid: str, subject: str) -> None:
    """Raise ``InputError`` when ``uid`` is no DICOM transfer syntax; ``subject`` names the file(s)."""
    if not is_transfer_syntax(uid):
        raise InputError(
            f"{subject}: TransferSyntaxUID {clean_text(uid, 80)!r} is not a DICOM transfer syntax (damaged or "
            "non-conformant file meta header), so the pixel data cannot be decoded; re-export the series from "
            "the scanner or PACS, or remove the file(s)"
        )


def require_decoder(transfer_syntax_uid: str, subject: str) -> None:
    """Raise ``DecoderMissingError`` naming the package to install when no decoder is present.

    ``subject`` starts the message: the series (``series …1234``) or the file.
    """
    if decoder_available(transfer_syntax_uid):
        return
    name = transfer_syntax_name(transfer_syntax_uid)
    package = _DECODER_PACKAGES.get(transfer_syntax_uid)
    if package is None:
        raise DecoderMissingError(
            f"{subject}: pixel data use the transfer syntax {name}, which no installed "
            "decoder reads; convert the series to uncompressed DICOM (e.g. dcmdjpeg/gdcmconv) first"
        )
    raise DecoderMissingError(
        f"{subject}: pixel data are compressed as {name} and no decoder is installed; "
        f"install one: pip install pylibjpeg {package} (or pip install python-gdcm)"
    )


# --------------------------------------------------------------------------- pixels


def stored_values(raw: npt.NDArray[Any], bits_stored: int, signed: bool) -> npt.NDArray[np.int64]:
    """Stored pixel values with the unused high bits masked off and, if signed, sign-extended."""
    values = raw.astype(np.int64) & ((1 << bits_stored) - 1)
    if signed:
        sign_bit = 1 << (bits_stored - 1)
        values = (values ^ sign_bit) - sign_bit
    return values


def decode_stored_values(header: SliceHeader, root: Path | None = None) -> npt.NDArray[np.int64]:
    """Decode one file's pixels to (rows, columns) stored values (masked, sign-extended).

    Raises ``InputError`` naming the file when the pixel data are missing, short or undecodable.
    """
    name = display_path(header.path, root)
    expected = header.rows * header.columns
    try:
        with warnings.catch_warnings(), pydicom_log_captured():
            # pydicom's header warnings were summarised once per series when it was described.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(header.path, force=True)
            if "PixelData" not in ds:
                raise InputError(f"{name}: no pixel data (file truncated); skip or replace the file")
            if is_encapsulated(header.transfer_syntax):
                raw = np.asarray(ds.pixel_array)
            else:
                byte_order = ">" if header.transfer_syntax == ExplicitVRBigEndian else "<"
                dtype = np.dtype(f"{byte_order}u{header.bits_allocated // 8}")
                data = ds.PixelData
                if len(data) < expected * dtype.itemsize:
                    raise InputError(
                        f"{name}: pixel data hold {len(data)} bytes, {expected * dtype.itemsize} expected "
                        "(file truncated); replace the file"
                    )
                raw = np.frombuffer(data, dtype=dtype, count=expected)
    except InputError:
        raise
    except READ_ERRORS as error:
        raise InputError(
            f"{name}: pixel data cannot be decoded ({clean_text(type(error).__name__)}: "
            f"{clean_text(error, 120)}); the file is damaged, replace or remove it"
        ) from None
    if raw.size != expected:
        raise InputError(f"{name}: decoded {raw.size} pixels, header declares {header.rows}×{header.columns}")
    return stored_values(raw.reshape(header.rows, header.columns), header.bits_stored, header.signed)


def padding_mask(stored: npt.NDArray[np.int64], header: SliceHeader) -> npt.NDArray[np.bool_] | None:
    """Pixels the scanner marked as padding (PixelPaddingValue, optionally a range), or None."""
    if header.padding_value is None:
        return None
    bounds = stored_values(
        np.asarray(
            [
                header.padding_value,
                header.padding_limit if header.padding_limit is not None else header.padding_value,
            ]
        ),
        header.bits_stored,
        header.signed,
    )
    low, high = int(bounds.min()), int(bounds.max())
    return (stored >= low) & (stored <= high)
