"""PulmoMed Edge: the offline Spanish AI teacher for the PulmoMed VR lung-cancer simulator."""

__version__ = "0.1.0"
