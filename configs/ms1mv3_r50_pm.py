from easydict import EasyDict as edict

# Prototype Memory, 8 GPUs x 128 (global batch 1024, 512 classes per step).
# memory_size 65536: a prototype lives ~128 steps after its last write (see README).
config = edict()
config.network = "r50"
config.output = "work_dirs/ms1mv3_r50_pm"
config.head = "prototype_memory"
config.memory_size = 65536
config.samples_per_class = 2
config.fp16 = True
config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
config.save_all_states = True
