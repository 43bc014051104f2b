"""Config files: argument parsing, the tiny settings, every field reaching the trainer, one
source of each default, and a comment for every field."""

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize

import pytest

from configs import common, finetune, pretrain
from moe_embed.data.pipeline import InputConfig
from moe_embed.model import config as model_config
from moe_embed.train import config as run_config
from moe_embed.train.optimizer import OptimizerConfig
from moe_embed.train.step import LossConfig


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
  assert inputs.packing  # Both recipes pack: measured faster at their widths.
  assert inputs.pack_balance_steps == 8  # Steps dealt among each other by tokens.
  assert inputs.pack_shapes == 3  # Rows per step by source, in at most 3 counts.
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


# --- One source of each default, every field commented ----------------------------------


def test_run_config_sections_are_the_dataclass_defaults():
  """common.py states no default of its own for input, optimizer and loss: the
  dataclasses' defaults are the run config's."""
  c = common.base_config("tiny")
  assert run_config.input_config(c) == InputConfig()
  assert run_config.optimizer_config(c) == OptimizerConfig()
  assert run_config.loss_config(c, 64) == LossConfig()
  for cls, section in ((InputConfig, c.input), (OptimizerConfig, c.optimizer),
                       (LossConfig, c.loss)):
    assert sorted(section) == sorted(f.name for f in dataclasses.fields(cls))


def _assignments(func) -> list[tuple[tuple[str, ...], object]]:
  """(field path, literal value) of every `c.a.b = <literal>` in `func`'s source."""
  out = []
  for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(func)))):
    if not isinstance(node, ast.Assign) or len(node.targets) != 1:
      continue
    path, target = [], node.targets[0]
    while isinstance(target, ast.Attribute):
      path.insert(0, target.attr)
      target = target.value
    if isinstance(target, ast.Name) and target.id == "c" and path:
      try:
        out.append((tuple(path), ast.literal_eval(node.value)))
      except ValueError:
        pass  # Not a literal (a section, a placeholder, an argument).
  return out


def _at(config, path):
  for key in path:
    config = config[key]
  return config


@pytest.mark.parametrize("func", [finetune.get_config, pretrain.get_config, common.apply_tiny],
                         ids=["finetune", "pretrain", "apply_tiny"])
def test_stage_configs_state_only_what_differs_from_common(func):
  base = common.base_config("minilm")
  sets = _assignments(func)
  assert sets, "no assignments found"
  for path, value in sets:
    assert _at(base, path) != value, f"{'.'.join(path)} = {value!r} restates common.py"


def test_common_overrides_only_what_differs_from_the_dataclasses():
  encoder = model_config.preset("minilm")
  for path, value in _assignments(common.base_config):
    if path[0] == "encoder":
      assert getattr(encoder, path[1]) != value, f"encoder.{path[1]} restates EncoderConfig"
    assert path[0] not in ("input", "optimizer", "loss"), (
        f"{'.'.join(path)}: change the default in the section's dataclass")


def _comment_lines(source: str) -> tuple[set[int], list[str]]:
  """(1-based numbers of lines that hold a comment, the source's lines)."""
  tokens = tokenize.generate_tokens(io.StringIO(source).readline)
  return {t.start[0] for t in tokens if t.type == tokenize.COMMENT}, source.splitlines()


def _is_commented(line: int, comments: set[int], lines: list[str]) -> bool:
  """A comment on the line, or a comment block above the run of uncommented lines it ends."""
  if line in comments:
    return True
  for above in range(line - 1, 0, -1):
    text = lines[above - 1].strip()
    if not text or above in comments and not text.startswith("#"):
      return False  # A blank line, or a statement with its own comment.
    if text.startswith("#"):
      return True
  return False


def _field_lines(cls) -> dict[str, int]:
  """Field name -> its line in `cls`'s module."""
  source, first = inspect.getsourcelines(cls)
  tree = ast.parse(textwrap.dedent("".join(source)))
  return {n.target.id: first + n.lineno - 1 for n in tree.body[0].body
          if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def _assignment_lines(func) -> dict[tuple[str, ...], int]:
  source, first = inspect.getsourcelines(func)
  out = {}
  for node in ast.walk(ast.parse(textwrap.dedent("".join(source)))):
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
      path, target = [], node.targets[0]
      while isinstance(target, ast.Attribute):
        path.insert(0, target.attr)
        target = target.value
      if isinstance(target, ast.Name) and target.id == "c" and path:
        out.setdefault(tuple(path), first + node.lineno - 1)
  return out


def _leaves(d: dict, prefix=()):
  for key, value in d.items():
    if isinstance(value, dict) and value:
      yield from _leaves(value, prefix + (key,))
    else:
      yield prefix + (key,)


def test_every_field_of_every_preset_has_a_comment():
  """Where each default is written (common.py, or the section's dataclass), a comment says
  what the field means."""
  sources = {}

  def commented(obj, line):
    module = inspect.getmodule(obj)
    if module not in sources:
      sources[module] = _comment_lines(inspect.getsource(module))
    return _is_commented(line, *sources[module])

  sections = {"encoder": model_config.EncoderConfig, "input": InputConfig,
              "optimizer": OptimizerConfig, "loss": LossConfig}
  field_lines = {name: _field_lines(cls) for name, cls in sections.items()}
  base_lines = _assignment_lines(common.base_config)
  paths = {path for module in (finetune, pretrain) for arg in ("tiny", "minilm", "nomic_v2_moe")
           for path in _leaves(module.get_config(arg).to_dict())}
  missing = []
  for path in sorted(paths):
    if path[0] in sections and len(path) == 2:
      ok = commented(sections[path[0]], field_lines[path[0]][path[1]])
    else:
      ok = path in base_lines and commented(common.base_config, base_lines[path])
    if not ok:
      missing.append(".".join(path))
  assert not missing, f"fields without a comment: {missing}"


def test_misspelt_grouped_matmul_kernel_fails_when_the_config_is_made():
  from moe_embed.model import config as model_config
  from moe_embed.moe import grouped_matmul
  for kernel in ("auto",) + grouped_matmul.KERNELS:
    assert model_config.preset("tiny", grouped_matmul=kernel).grouped_matmul == kernel
  c = finetune.get_config("tiny")
  c.encoder.grouped_matmul = "windowd"
  with pytest.raises(ValueError) as error:  # Before any model is built or traced.
    run_config.resolve_encoder(c)
  message = str(error.value)
  assert message.startswith("grouped_matmul='windowd' is not one of") and "\n" not in message
  for kernel in ("auto",) + grouped_matmul.KERNELS:
    assert repr(kernel) in message
  with pytest.raises(ValueError, match="grouped_matmul='ragged'"):
    model_config.preset("tiny").replace(grouped_matmul="ragged")  # A model folder's override.


@pytest.mark.parametrize("section,field,nearest", [
    ("optimizer", "learnig_rate", "learning_rate"),
    ("optimizer", "zzz", None),  # Far from every field: still the nearest one.
    ("input", "max_qery_len", "max_query_len"),
    ("encoder", "num_expert", "num_experts"),
])
def test_unknown_fields_name_the_nearest_known_one(section, field, nearest):
  from moe_embed import validation
  c = finetune.get_config("tiny")
  c.unlock()
  c[section][field] = 1
  convert = {"optimizer": run_config.optimizer_config, "input": run_config.input_config,
             "encoder": lambda c: run_config.resolve_encoder(c)}[section]
  with pytest.raises((KeyError, ValueError)) as error:
    convert(c)
  names = list(c[section].keys())
  names.remove(field)
  guess = nearest or validation.nearest(field, names)
  assert guess in names and f"Unknown {section}" in str(error.value)
  assert f"Did you mean {guess!r}?" in str(error.value)


def test_source_option_keys_name_the_nearest_known_one():
  from moe_embed.data import dataset
  with pytest.raises(ValueError, match=r"Unknown --source_prefixes\['clf'\] key 'doc_prefx'\. "
                                       r"Did you mean 'doc_prefix'\?"):
    dataset.parse_source_options('{"clf": {"doc_prefx": "x"}}')
  c = finetune.get_config("tiny")
  c.input.source_prefixes = {"clf": {"max_doc_lne": 8}}
  with pytest.raises(run_config.ConfigError, match=r"Did you mean 'max_doc_len'\?"):
    run_config.input_config(c)


def test_matryoshka_widths_are_checked_by_one_function():
  from moe_embed import validation
  for ok in (None, 1, 16):
    validation.check_widths([ok], 16)
  for bad in (0, 17, -4, True):
    with pytest.raises(ValueError, match=f"Matryoshka width dims={bad} must be between 1 and "
                                         "the embedding width 16"):
      validation.check_widths([8, bad], 16, "dims")
