"""``python -m protomem_plugin.arcface_torch CHECKOUT CONFIG``."""
from . import main

main()
