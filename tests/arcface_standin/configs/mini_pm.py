from easydict import EasyDict as edict

config = edict()
config.head = "prototype_memory"
config.memory_size = 16
config.num_classes = 20
config.num_epoch = 1
config.steps = 120
