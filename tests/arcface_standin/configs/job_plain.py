from easydict import EasyDict as edict

config = edict()
config.rec = "data"
config.num_classes = 24
config.num_image = 96
config.num_epoch = 2
config.warmup_epoch = 0
config.val_targets = ["val"]
config.verbose = 6
config.image_size = 32
