from easydict import EasyDict as edict

config = edict()
config.num_classes = 20
config.num_epoch = 1
config.steps = 5
