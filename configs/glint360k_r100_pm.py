from easydict import EasyDict as edict

# Prototype Memory, 8 GPUs x 128 (global batch 1024, 512 classes per step).
# memory_size 131072: a prototype lives ~256 steps after its last write (see README).
config = edict()
config.network = "r100"
config.output = "work_dirs/glint360k_r100_pm"
config.head = "prototype_memory"
config.memory_size = 131072
config.samples_per_class = 2
config.fp16 = True
config.rec = "/train_tmp/glint360k"
config.num_classes = 360232
config.num_image = 17091657
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
config.save_all_states = True
