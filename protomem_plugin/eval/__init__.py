"""Evaluation: IJB-B/C 1:1 and 1:N (``ijb``), ``.bin`` pair verification (``verification``).

Modules: ``ijb_meta`` (meta-file readers), ``extract`` (alignment + embedding), ``embedders``
(PyTorch / ONNX models), ``templates`` (image -> template aggregation), ``metrics`` (TAR@FAR,
rank-k, TPIR@FPIR), ``report`` (markdown + ROC plot), ``synthetic_ijb`` (a synthetic benchmark
in the IJB layout), ``cli`` (command-line entry points). Import the submodule you need; this
package does not import them eagerly.
"""
