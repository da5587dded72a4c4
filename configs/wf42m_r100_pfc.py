from easydict import EasyDict as edict

# Partial FC baseline (32 GPUs x 128), sample_rate 0.2.
config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r100"
config.resume = False
config.output = "work_dirs/wf42m_r100_pfc"
config.embedding_size = 512
config.head = "partial_fc"
config.sample_rate = 0.2
config.fp16 = True
config.batch_size = 128
config.optimizer = "sgd"
config.lr = 0.4
config.momentum = 0.9
config.weight_decay = 5e-4
config.verbose = 2000
config.frequent = 10
config.dali = True
config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 20
config.warmup_epoch = 2
config.val_targets = []
config.save_all_states = True
config.num_workers = 2
