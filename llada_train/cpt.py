"""Continued pre-training of a LLaDA2.x block-diffusion model (M2T + T2T), on DeepSpeed ZeRO.

    python -m llada_train.cpt +recipe=tiny                       # CPU, shipped data
    torchrun --nproc_per_node 8 -m llada_train.cpt +recipe=mini init_from=DIR ...
    python -m llada_train.cpt +recipe=mini dry_run=true          # sizes + DeepSpeed config

Config: conf/cpt.yaml over the typed schema in llada_train/config.py; the loop is
llada_train/train.py, shared with the other pre-training entry point.
"""

import hydra
from omegaconf import DictConfig

from llada_train import CONF_DIR
from llada_train.config import register_configs
from llada_train.errors import user_errors
from llada_train.train import train

register_configs("cpt")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="cpt")
@user_errors
def main(cfg: DictConfig) -> None:
    train(cfg, task="cpt")


if __name__ == "__main__":
    main()
