from easydict import EasyDict as edict

# Partial FC baseline on the built-in synthetic identities, a few minutes on a CPU.
# The dataset is generated into `rec` on the first run and reused afterwards.
config = edict()
config.head = "partial_fc"
config.sample_rate = 0.5        # the same number of logit columns as synthetic_pm's memory
config.samples_per_class = 2
config.margin_list = (1.0, 0.0, 0.35)
config.margin_scale = 32.0
config.network = "tiny"
config.embedding_size = 128
config.image_size = 56
config.batch_size = 64
config.lr = 0.1
config.weight_decay = 5e-4
config.num_epoch = 4
config.warmup_epoch = 0
config.rec = "./data_cache/synthetic_s56_n500"
config.synthetic = dict(num_identities=500, images_per_identity=16, val_identities=100, val_pairs=1000,
                        image_size=56, degraded_fraction=0.2, seed=0)
config.num_classes = 500
config.num_image = 8000
config.val_targets = ["val"]
config.verbose = 250
config.frequent = 25
config.num_workers = 2
config.output = "work_dirs/synthetic_pfc"
