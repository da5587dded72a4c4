from easydict import EasyDict as edict

config = edict()
config.head = "prototype_memory"
config.memory_size = 24
config.samples_per_class = 4
config.rec = "data"
config.num_classes = 24
config.num_image = 96
config.num_epoch = 2
config.warmup_epoch = 0
config.val_targets = ["val"]
config.verbose = 6
config.image_size = 32
