from easydict import EasyDict as edict

# Quality-Aware Prototype Memory, 8 GPUs x 128 (global batch 1024, 512 classes per step).
# memory_size 65536: a prototype lives ~128 steps after its last write (see README).
config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r50"
config.resume = False
config.output = "work_dirs/ms1mv3_r50_qapm"
config.embedding_size = 512
config.head = "qapm"
config.memory_size = 65536
config.samples_per_class = 2
config.quality_source = "norm"
config.fp16 = True
config.batch_size = 128
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.verbose = 2000
config.frequent = 10
config.dali = False
config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
config.save_all_states = True
config.num_workers = 2
