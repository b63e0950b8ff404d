"""`python -m llada_train.rl conf=ebpo [+recipe=tiny]`: RL post-training with EBPO.

Config: conf/rl.yaml over the RLConfig schema (llada_train/config.py); the `conf` group
(conf/rl/{ebpo,grpo}.yaml) picks the objective; `+recipe=NAME` reads recipes/rl/NAME.yaml.
The loop is llada_train/rl/loop.py; `torchrun` runs the same loop on several processes.
`dry_run=true` prints the model's sizes, the DeepSpeed config and the memory plan, and exits.
"""

import hydra
from omegaconf import DictConfig

from llada_train import CONF_DIR
from llada_train.config import register_configs
from llada_train.errors import user_errors

register_configs("rl")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="rl")
@user_errors
def main(cfg: DictConfig) -> None:
    from llada_train.rl.loop import rl_train

    rl_train(cfg)


if __name__ == "__main__":
    main()
