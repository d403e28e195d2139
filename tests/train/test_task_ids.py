"""Task ids for MoE task adapters (jaxmoe.train.tasks; paper_methods.md §h) from the data to the model: batches
carry one task per row (packed rows hold one task), a trainer run on two language pairs trains each pair's adapter
and exports its task names, generation and beam search take a task id per prompt, and the errors for directions
without an id. Tiny models (d <= 32, one layer), tiny corpora."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmoe
from jaxmoe.demo import write_corpus
from jaxmoe.train.batches import BatchStream, eval_batches
from jaxmoe.train.run_config import ConfigError
from jaxmoe.train.tasks import TaskMap
from jaxmoe.train.trainer import train

ADAPTERS = {"mode": "static", "num_tasks": 3, "bottleneck": 4}  # id 2 reserved: no data has it


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Small English <-> Zentish files; used in both directions they are two language pairs."""
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder, seed=5, sizes=dict(train=40, valid=4, test=2))
    return folder


def task_config(corpus: Path, run_dir: Path, **sections) -> dict:
    def split(name):
        return {"pairs": [{"src": str(corpus / f"{name}.en"), "tgt": str(corpus / f"{name}.zt"), "src_lang": "en",
                           "tgt_lang": "zt"}], "both_directions": True}
    config = {
        "run_dir": str(run_dir), "seed": 1, "log_every": 1, "progress": False,
        "model": {"preset": "tiny-moe", "overrides": {"hidden_size": 32, "intermediate_size": 48, "num_layers": 1,
                                                      "max_position_embeddings": 80,
                                                      "moe": {"task_adapters": ADAPTERS}}},
        "tokenizer": {"bpe_vocab_size": 300},
        "data": {"train": split("train"), "valid": split("valid"), "test": split("test"), "tasks": "lang_pair",
                 "prompt": "{src_lang}: {src} =>", "max_len": 64, "data_dir": str(corpus / "tfds")},
        "optim": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "learning_rate": 3e-3},
        "checkpoint": {"every": 2, "keep_last": 1, "keep_best": 1},
        "eval": {"every": 0, "translate": 2, "max_new_tokens": 4, "batch_size": 2},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def _adapter_rows(model) -> np.ndarray:
    """|w_up| summed per task row over the layers: float [tasks]; w_up starts at zero, so a row that never
    trained is exactly 0."""
    return sum(np.abs(np.asarray(layer.mlp.task_adapter.w_up[...])).sum(axis=(1, 2)) for layer in model.layers)


# ------------------------------------------------------------------------------------------------ batches

def _examples(n: int = 12, seed: int = 0):
    """(ids, loss_mask) pairs of 2-6 tokens whose first id says the task (first id % 2)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = [10 + i] + rng.integers(3, 9, size=int(rng.integers(1, 6))).tolist()
        out.append((ids, [0] + [1] * (len(ids) - 1)))
    return out


def test_a_packed_row_holds_examples_of_its_own_task_only():
    stream = BatchStream(_examples(), batch_size=3, max_len=16, pad_id=0, pack=True, task=lambda e: e[0][0] % 2)
    for _ in range(4):
        batch = next(stream)
        for row, task in zip(range(3), batch["task_ids"]):
            starts = np.flatnonzero(np.diff(batch["segment_ids"][row], prepend=0) > 0)
            assert starts.size and all(batch["input_ids"][row, s] % 2 == task for s in starts)
    assert batch["task_ids"].dtype == np.int32 and batch["task_ids"].shape == (3,)


def test_one_task_for_every_example_packs_exactly_as_without_tasks():
    plain = BatchStream(_examples(), batch_size=3, max_len=16, pad_id=0, pack=True)
    tasked = BatchStream(_examples(), batch_size=3, max_len=16, pad_id=0, pack=True, task=lambda e: 0)
    for _ in range(5):
        a, b = next(plain), next(tasked)
        assert "task_ids" not in a and b.pop("task_ids").tolist() == [0, 0, 0]
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_eval_batches_carry_the_task_ids_of_the_examples_they_keep():
    examples = [([1, 2], [0, 1]), ([1] * 9, [1] * 9), ([3, 4, 5], [0, 1, 1])]  # the second is over max_len
    batches = eval_batches(examples, batch_size=2, max_len=4, pad_id=0, task_ids=[1, 2, 0])
    assert len(batches) == 1 and batches[0]["task_ids"].tolist() == [1, 0]
    assert "task_ids" not in eval_batches(examples, batch_size=2, max_len=4, pad_id=0)[0]


# ------------------------------------------------------------------------------------------------ the trainer

@pytest.fixture(scope="module")
def task_run(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tasks") / "run"
    train(task_config(corpus, run_dir), log=lambda _: None)
    return run_dir


@pytest.mark.slow  # a trainer run: ~20 s, mostly compiling
def test_a_run_on_two_language_pairs_trains_each_pairs_adapter_and_exports_the_task_ids(task_run):
    expected = TaskMap("lang_pair", ("en-zt", "zt-en"))  # sorted: the order of the data does not matter
    summary = json.loads((task_run / "summary.json").read_text())
    assert summary["tasks"] == expected.to_dict()
    assert TaskMap.load(task_run) == TaskMap.load(task_run / "model") == expected
    model = jaxmoe.load_model(task_run / "model")
    assert model.config.moe.task_adapters == jaxmoe.TaskAdapterConfig(**ADAPTERS)
    rows = _adapter_rows(model)
    # Both pairs' rows reached the model and trained; the reserved id 2 had no rows, so its adapter is untouched.
    assert rows[0] > 0 and rows[1] > 0 and rows[2] == 0
    for direction in ("en-zt", "zt-en"):
        assert len((task_run / f"test.{direction}.hyp.txt").read_text().splitlines()) == 2


@pytest.mark.slow  # a second trainer run, on a data x expert mesh
def test_task_ids_on_a_mesh_give_the_single_device_losses(corpus, task_run, tmp_path):
    from jaxmoe.train.metrics import read_metrics
    train(task_config(corpus, tmp_path / "mesh", mesh={"data": 2, "expert": 2}, eval={"translate": 0}),
          log=lambda _: None)
    losses = [{r["step"]: r["loss"] for r in read_metrics(run) if r["split"] == "train"}
              for run in (task_run, tmp_path / "mesh")]
    np.testing.assert_allclose([losses[1][s] for s in (1, 2)], [losses[0][s] for s in (1, 2)], rtol=1e-5)


@pytest.mark.slow  # a second trainer run (init_from the export, one task's rows trained)
def test_only_task_trains_that_tasks_rows_from_the_exported_model(corpus, task_run, tmp_path):
    config = task_config(corpus, tmp_path / "new", optim={"only_task": "zt-en"})
    config["model"] = {"init_from": str(task_run / "model")}
    config["tokenizer"] = {}
    train(config, log=lambda _: None)
    before, after = jaxmoe.load_model(task_run / "model"), jaxmoe.load_model(tmp_path / "new" / "model")
    changed = []
    for (path, old), (_, new) in zip(nnx.to_flat_state(nnx.state(before, nnx.Param)),
                                     nnx.to_flat_state(nnx.state(after, nnx.Param))):
        old, new = np.asarray(old.get_value()), np.asarray(new.get_value())
        if not np.array_equal(old, new):
            changed.append(".".join(map(str, path)))
            assert np.array_equal(old[[0, 2]], new[[0, 2]]), path  # the other tasks' rows
    assert changed and all("task_adapter" in p for p in changed)
    assert TaskMap.load(tmp_path / "new" / "model") == TaskMap.load(task_run / "model")


def test_a_pair_without_a_task_id_is_named_with_the_known_ones(corpus, tmp_path):
    config = task_config(corpus, tmp_path / "run", data={"task_names": ["en-zt"]})
    with pytest.raises(ConfigError, match=r"data.train: language pair 'zt-en' \(zt -> en\) has no task id; the known "
                                          r"tasks are \{0: 'en-zt'\}"):
        train(config, log=lambda _: None)


def test_task_ids_for_a_model_without_task_adapters_are_refused(corpus, tmp_path):
    config = task_config(corpus, tmp_path / "run")
    config["model"]["overrides"] = {**config["model"]["overrides"], "moe": {}}
    with pytest.raises(ConfigError, match=r"data.tasks='lang_pair', but the model has no MoE task adapters"):
        train(config, log=lambda _: None)


@pytest.mark.parametrize("data, optim, message", [
    ({"tasks": "pair"}, {}, r"data.tasks='pair'; expected lang_pair .* or tgt_lang"),
    ({"task_names": ["de-en"]}, {}, r"data.task_names=\['de-en'\] without data.tasks"),
    ({}, {"only_task": "de-en"}, r"optim.only_task='de-en' needs data.tasks"),
])
def test_run_config_task_keys_are_checked(corpus, tmp_path, data, optim, message):
    from jaxmoe.train.run_config import run_config_from_dict
    config = task_config(corpus, tmp_path / "run", optim=optim)
    config["data"] = {**{k: v for k, v in config["data"].items() if k != "tasks"}, **data}
    with pytest.raises(ConfigError, match=message):
        run_config_from_dict(config)


def test_task_map_names_an_unknown_direction_and_the_known_tasks():
    tasks = TaskMap.from_directions("tgt_lang", [("en", "de"), ("de", "en"), ("cs", "en")])
    assert tasks.names == ("de", "en") and tasks.id_of("fr", "en") == 1
    with pytest.raises(ValueError, match=r"target language 'zh' \(en -> zh\) has no task id; the known tasks are "
                                         r"\{0: 'de', 1: 'en'\}"):
        tasks.id_of("en", "zh")
    extended = TaskMap.from_directions("tgt_lang", [("de", "cs"), ("en", "de")], base=tasks)
    assert extended.names == ("de", "en", "cs")  # the base's ids kept, new tasks after them


# ------------------------------------------------------------------------------------------------ generation

def _task_model() -> jaxmoe.PhimoeForCausalLM:
    """One layer, static adapters for 3 tasks, every parameter random (the zero-initialised up-projections too,
    so each task's adapter changes the output)."""
    config = jaxmoe.get_preset("tiny-moe").replace(
        vocab_size=64, hidden_size=16, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
        moe=jaxmoe.MoEConfig(num_experts=4, top_k=2, router="topk",
                             task_adapters=jaxmoe.TaskAdapterConfig("static", num_tasks=3, bottleneck=4)))
    model = nnx.eval_shape(lambda: jaxmoe.PhimoeForCausalLM(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
    nnx.update(model, jax.tree.unflatten(treedef, [jnp.asarray(0.5 * rng.normal(size=x.shape), x.dtype)
                                                    for x in leaves]))
    model.eval()
    return model


PROMPTS = np.array([[5, 9, 11, 3, 7], [5, 9, 11, 3, 7], [12, 4, 8, 20, 6]], np.int32)
TASKS = np.array([0, 2, 1], np.int32)  # rows 0 and 1: the same prompt, two tasks


def test_greedy_rows_with_task_ids_equal_each_row_generated_alone():
    model = _task_model()
    together = np.asarray(jaxmoe.generate(model, PROMPTS, max_new_tokens=6, task_ids=TASKS, eos_token_id=()))
    for i in range(len(PROMPTS)):
        alone = jaxmoe.generate(model, PROMPTS[i:i + 1], max_new_tokens=6, task_ids=TASKS[i:i + 1], eos_token_id=())
        np.testing.assert_array_equal(together[i], np.asarray(alone)[0])
    assert not np.array_equal(together[0], together[1])  # the task changes what the same prompt generates
    with pytest.raises(ValueError, match=r"pass task_ids=int \[batch\]"):
        jaxmoe.generate(model, PROMPTS, max_new_tokens=2)


@pytest.mark.slow  # two compiles of the beam search program: ~7 s
def test_beam_search_gives_every_beam_its_prompts_task_id():
    model = _task_model()
    together = np.asarray(jaxmoe.generate(model, PROMPTS, max_new_tokens=4, num_beams=2, task_ids=TASKS,
                                          eos_token_id=()))
    for i in range(len(PROMPTS)):
        alone = jaxmoe.generate(model, PROMPTS[i:i + 1], max_new_tokens=4, num_beams=2, task_ids=TASKS[i:i + 1],
                                eos_token_id=())
        np.testing.assert_array_equal(together[i], np.asarray(alone)[0])
