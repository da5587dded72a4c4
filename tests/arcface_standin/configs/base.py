from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "linear"
config.output = None
config.embedding_size = 16
config.sample_rate = 1.0
config.interclass_filtering_threshold = 0
config.fp16 = False
config.batch_size = 8
config.lr = 0.1
config.seed = 2048
