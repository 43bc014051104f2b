"""Config files: argument parsing, the tiny settings, and every field reaching the trainer."""

import pytest

from configs import common, finetune, pretrain
from moe_embed.train import config as run_config


def test_config_arguments_parse_strictly():
  args = common.parse_arg("model=minilm,steps=7,fast=False,full=true", model="tiny", steps=0,
                          fast=True, full=False)
  assert (args.model, args.steps, args.fast, args.full) == ("minilm", 7, False, True)
  assert common.parse_arg("nomic_v2_moe", model="tiny").model == "nomic_v2_moe"
  with pytest.raises(ValueError, match="fast='maybe' is not a boolean"):
    common.parse_arg("fast=maybe", fast=True)
  with pytest.raises(ValueError, match="steps='ten' is not a int"):
    common.parse_arg("steps=ten", steps=0)
  with pytest.raises(KeyError, match="Unknown config argument 'stpes'"):
    common.parse_arg("stpes=5", steps=0)


@pytest.mark.parametrize("module", [finetune, pretrain])
@pytest.mark.parametrize("arg", ["tiny", "minilm"])
def test_config_sections_become_structured_values(module, arg):
  c = module.get_config(arg)
  inputs = run_config.input_config(c)
  opt = run_config.optimizer_config(c)
  loss = run_config.loss_config(c, 64)
  assert inputs.max_doc_len == c.input.max_doc_len and opt.learning_rate == c.optimizer.learning_rate
  assert loss.temperature == c.loss.temperature
  if module is finetune:
    # Finetuning keeps hard negatives; tiny uses them where the data has them.
    assert inputs.num_negatives == 10
    assert inputs.negatives_required == (arg != "tiny")


def test_misspelt_section_fields_are_named():
  c = finetune.get_config("tiny")
  c.unlock()
  c.optimizer.learnig_rate = 1.0
  with pytest.raises(run_config.ConfigError, match="learnig_rate"):
    run_config.optimizer_config(c)
  c.input.max_qery_len = 3
  with pytest.raises(run_config.ConfigError, match="Did you mean 'max_query_len'"):
    run_config.input_config(c)
