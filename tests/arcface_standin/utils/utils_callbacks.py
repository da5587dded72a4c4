import logging
import os

from eval import verification
from torch import distributed


class CallBackVerification(object):
    def __init__(self, val_targets, rec_prefix, summary_writer=None, image_size=(112, 112), wandb_logger=None):
        self.rank = distributed.get_rank()
        self.ver_list, self.ver_name_list, self.results = [], [], []
        if self.rank == 0:
            for name in val_targets:
                path = os.path.join(rec_prefix, name + ".bin")
                if os.path.exists(path):
                    self.ver_list.append(verification.load_bin(path, image_size))
                    self.ver_name_list.append(name)

    def __call__(self, num_update, backbone):
        if self.rank == 0 and num_update > 0:
            backbone.eval()
            for name, data_set in zip(self.ver_name_list, self.ver_list):
                acc1, std1, acc2, std2, xnorm, _ = verification.test(data_set, backbone, 10, 10)
                logging.info("[%s][%d]Accuracy-Flip: %1.5f+-%1.5f", name, num_update, acc2, std2)
                self.results.append({"step": num_update, "name": name, "acc2": acc2, "xnorm": xnorm})
            backbone.train()
