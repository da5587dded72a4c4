import importlib
import os.path as osp


def get_config(config_file):
    assert config_file.startswith("configs/"), "config file setting must start with configs/"
    temp_module_name = osp.splitext(osp.basename(config_file))[0]
    cfg = importlib.import_module("configs.base").config
    job_cfg = importlib.import_module("configs.%s" % temp_module_name).config
    cfg.update(job_cfg)
    if cfg.output is None:
        cfg.output = osp.join("work_dirs", temp_module_name)
    return cfg
