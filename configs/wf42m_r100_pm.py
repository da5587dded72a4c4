from easydict import EasyDict as edict

# Prototype Memory, 32 GPUs x 128 (global batch 4096, 2048 classes per step).
# memory_size 262144: a prototype lives ~128 steps after its last write (see README).
config = edict()
config.network = "r100"
config.output = "work_dirs/wf42m_r100_pm"
config.head = "prototype_memory"
config.memory_size = 262144
config.samples_per_class = 2
config.fp16 = True
config.lr = 0.4
config.dali = True
config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 20
config.warmup_epoch = 2
config.val_targets = []
config.save_all_states = True
