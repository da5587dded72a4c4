from protomem_plugin.backbones import get_model  # noqa: F401  (arcface_torch's networks are not reproduced)
