"""corona-ct: COVID-19 pneumonia detection and quantification on chest CT (research use only)."""

__version__ = "0.1.0"
