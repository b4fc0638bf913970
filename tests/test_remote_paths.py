"""A gs:// workdir, on a Google Cloud Storage emulator running on this machine.

The emulator is `gcp-storage-emulator` (PyPI; pure Python, in memory, on a
loopback port), started by the `gcs` fixture; its downloads are given the
generation headers Cloud Storage sends, which tensorstore reads
(`_with_generation_headers`). The clients are pointed at it:
  - etils.epath (config.json, metrics.jsonl, results, libraries, task
    embeddings, merges, plots; orbax's own folder and metadata files):
    EPATH_USE_TF=false routes gs:// through fsspec's gcsfs, which honours
    STORAGE_EMULATOR_HOST (TensorFlow's GCS client, epath's default when TF
    is installed, has no endpoint override);
  - tensorstore (orbax's array data): TENSORSTORE_GCS_HTTP_URL, with
    GOOGLE_AUTH_TOKEN_FOR_TESTING instead of a credential lookup.
Every other Google endpoint (metadata server, proxies) is pointed at a
closed loopback port, so nothing leaves this machine.

Not exercised here: TensorBoard events on gs:// (written by TensorFlow's own
GCS client, which cannot be pointed at an emulator; the runs here write them
to a local config.tensorboard_dir) and tf.io.gfile as epath's gs:// backend.

The training run: a tiny job whose --workdir is gs://BUCKET/..., SIGKILLed
after step 7 and run again: it resumes from its last checkpoint on the
emulator and ends equal to the same job run uninterrupted in a local folder.
"""
import importlib.util
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys

import flax.linen as nn
import fsspec
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils.epath import gpath

from mtjax import merging, paths
from mtjax.evaluation import analysis, plots
from mtjax.evaluation import results as results_lib
from mtjax.methods import adapters, library, transform
from mtjax.methods import lora as lora_lib
from mtjax.methods import soft_injection as si
from mtjax.models import decoder
from mtjax.routing import experts as ex
from mtjax.training import checkpoint
from job_env import job_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "mtjax-test"
STEPS, EVERY, KILL_AFTER = 12, 3, 7
TINY = [
    "--config.model.d_model=32", "--config.model.d_kv=8",
    "--config.model.num_heads=2", "--config.model.d_ff=64",
    "--config.model.num_layers=1", "--config.model.num_decoder_layers=1",
    "--config.batch_size=8", f"--config.num_train_steps={STEPS}",
    f"--config.checkpoint_every={EVERY}", "--config.keep_checkpoints=20",
    "--config.log_every=1", "--config.data.mixture=parity",
    "--config.eval.groups=('parity',)", "--config.eval.max_examples=4",
]
# configs/quickstart.py with TensorBoard events in a local folder.
WRAPPER = """from configs import quickstart


def get_config():
  c = quickstart.get_config()
  c.tensorboard_dir = {tb!r}
  return c
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _with_generation_headers(objects):
  """Makes the emulator's object downloads carry x-goog-generation and
  x-goog-metageneration, as Cloud Storage's do: tensorstore takes an object's
  generation from them (OCDBT revalidates its cached manifest with it) and
  fails with 'Malformed StorageGeneration' without them."""
  download = objects.download
  if getattr(download, "with_generation", False):
    return

  def with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"],
                                 request.params["object_id"])
    except Exception:  # noqa: BLE001 (a 404 already answered)
      return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])

  with_generation.with_generation = True
  objects.download = with_generation


@pytest.fixture(scope="module")
def gcs():
  """{env vars} pointing every client at an in-memory GCS emulator, which
  runs (in a thread of this process) for the module's tests."""
  if importlib.util.find_spec("gcsfs") is None or importlib.util.find_spec(
      "gcp_storage_emulator") is None:
    pytest.skip("needs the test extras gcsfs and gcp-storage-emulator "
                "(pip install -e '.[test]')")
  from gcp_storage_emulator import server  # noqa: PLC0415 (test extra)
  from gcp_storage_emulator.handlers import objects  # noqa: PLC0415 (as above)
  _with_generation_headers(objects)
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
  port = _free_port()
  emulator = server.create_server("127.0.0.1", port, in_memory=True,
                                  default_bucket=BUCKET)
  emulator.start()
  url, dead = f"http://127.0.0.1:{port}", "127.0.0.1:9"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "EPATH_USE_TF": "false",
         "FSSPEC_GCS_TOKEN": "anon",
         # gcsfs would otherwise ask (over gRPC) whether the bucket is zonal.
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
         "GCE_METADATA_HOST": dead, "GCE_METADATA_IP": dead,
         "GCE_METADATA_ROOT": dead, "NO_GCE_CHECK": "true",
         "https_proxy": f"http://{dead}", "HTTPS_PROXY": f"http://{dead}",
         "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  gpath._is_tf_installed.cache_clear()  # re-read EPATH_USE_TF (cached)
  # The plain client whatever gcsfs read from the environment at its import.
  from gcsfs import core  # noqa: PLC0415 (test extra)
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, core.GCSFileSystem, clobber=True)
  yield env
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  gpath._is_tf_installed.cache_clear()
  emulator.stop()


def test_local_paths_made_absolute_urls_kept():
  assert paths.is_url("gs://b/x") and not paths.is_url("runs/gs:/x")
  assert paths.absolute("gs://b/run") == "gs://b/run"
  assert paths.absolute("runs/a") == os.path.abspath("runs/a")
  assert paths.join("gs://b/run", "checkpoints") == "gs://b/run/checkpoints"
  assert paths.join("runs", "a", "b.json") == os.path.join("runs", "a",
                                                           "b.json")


# ------------------------------------------- a killed and resumed gs:// run

def _cmd(workdir, config="configs/quickstart.py"):
  return [sys.executable, "-m", "mtjax.main", f"--config={config}",
          f"--workdir={workdir}"] + TINY


def _env(extra=None):
  return job_env(**(extra or {}))


def _final_params(workdir):
  mngr = ocp.CheckpointManager(paths.join(workdir, "checkpoints"),
                               item_names=("state",))
  step = mngr.latest_step()
  state = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))["state"]
  mngr.close()
  return step, {k: np.asarray(v) for k, v in state["params"].items()}


def _losses(workdir):
  """{step: loss}; for a step logged twice (killed, then resumed) the last."""
  rows = [json.loads(x) for x in
          paths.read_text(paths.join(workdir, "metrics.jsonl")).splitlines()]
  return {r["step"]: r["train/loss"] for r in rows}


def test_gcs_workdir_killed_and_resumed_equals_a_local_uninterrupted_run(
    gcs, tmp_path):
  local = str(tmp_path / "local")
  subprocess.run(_cmd(local), cwd=REPO, env=_env(), check=True,
                 capture_output=True)
  config = tmp_path / "config_gcs.py"
  config.write_text(WRAPPER.format(tb=str(tmp_path / "tb")))
  workdir = f"gs://{BUCKET}/runs/killed"
  proc = subprocess.Popen(_cmd(workdir, str(config)), cwd=REPO,
                          env=_env(gcs), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  for line in proc.stdout:
    if line.startswith(f"step {KILL_AFTER}/"):
      proc.send_signal(signal.SIGKILL)
      break
  proc.stdout.read()
  assert proc.wait() == -signal.SIGKILL, "the run ended before the kill"
  assert paths.exists(paths.join(workdir, "config.json"))
  assert not paths.exists(paths.join(workdir, "results.json"))
  # The URL was not taken for a local path ('<cwd>/gs:/...').
  assert not os.path.exists(os.path.join(REPO, "gs:"))

  out = subprocess.run(_cmd(workdir, str(config)), cwd=REPO, env=_env(gcs),
                       check=True, capture_output=True, text=True).stdout
  start = int(next(x for x in out.splitlines()
                   if x.startswith("resumed from")).split()[-1])
  assert 0 < start <= KILL_AFTER and start % EVERY == 0, start
  step_a, params_a = _final_params(local)
  step_b, params_b = _final_params(workdir)
  assert step_a == step_b == STEPS and params_a.keys() == params_b.keys()
  for k in params_a:
    np.testing.assert_allclose(params_b[k], params_a[k], atol=1e-6, err_msg=k)
  la, lb = _losses(local), _losses(workdir)
  assert sorted(lb) == list(range(1, STEPS + 1))
  assert [lb[s] for s in range(start + 1, STEPS + 1)] == \
      [la[s] for s in range(start + 1, STEPS + 1)]
  with open(os.path.join(local, "results.json")) as f:
    assert paths.read_json(paths.join(workdir, "results.json")) == json.load(f)
  assert os.listdir(tmp_path / "tb")   # TensorBoard events, kept local here
  assert not os.path.exists(os.path.join(REPO, "gs:"))


def _files(folder):
  """{relative name: bytes} of every file under a local folder or URL."""
  return {n: paths.read_bytes(paths.join(folder, n))
          for n in paths.files(folder)}


def _state(x):
  return {"step": jnp.asarray(x, jnp.int32),
          "params": {"w": jnp.full((4, 3), float(x))}}


def test_unfinished_gcs_checkpoint_is_ignored_then_rewritten(gcs):
  """On an object store orbax writes a step in place and finalizes it with
  commit_success.txt: a step folder without it (a save killed half-way) is
  listed as incomplete and never restored."""
  workdir = f"gs://{BUCKET}/ckpt_unit"
  mngr = checkpoint.manager(workdir, save_every=1, keep=5, async_save=False)
  for step in (1, 2):
    assert checkpoint.save(mngr, step, _state(step))
  mngr.close()
  folder = paths.join(workdir, "checkpoints")
  # Step 3 killed before it was finalized: step 2's files without the
  # step's commit_success.txt.
  for name, data in _files(paths.join(folder, "2")).items():
    if name != "commit_success.txt":
      paths.write_bytes(paths.join(folder, "3", name), data)
  assert checkpoint.incomplete_checkpoints(workdir) == ["3"]
  assert checkpoint.finalized_steps(folder) == [1, 2]
  mngr = checkpoint.manager(workdir, save_every=1, keep=5, async_save=False)
  assert mngr.all_steps() == [1, 2]
  state, step = checkpoint.restore_latest(mngr, _state(0))
  assert step == 2 and float(state["params"]["w"][0, 0]) == 2.0
  assert checkpoint.save(mngr, 3, _state(3))   # over the unfinished folder
  mngr.close()
  assert checkpoint.incomplete_checkpoints(workdir) == []
  mngr = checkpoint.manager(workdir, save_every=1, keep=5, async_save=False)
  state, step = checkpoint.restore_latest(mngr, _state(0))
  mngr.close()
  assert step == 3 and float(state["params"]["w"][0, 0]) == 3.0


# ------------------------------------------------ what mtjax itself writes

def test_config_results_metrics_plots_embeddings_on_gcs(gcs):
  root = f"gs://{BUCKET}/outputs"
  config = ml_collections.ConfigDict({"seed": 0, "lr": 0.1,
                                      "overwrite_config": False})
  checkpoint.check_workdir_config(root, config)
  assert paths.read_json(paths.join(root, "config.json"))["lr"] == 0.1
  checkpoint.check_workdir_config(root, config)      # the same: accepted
  config.lr = 0.2
  with pytest.raises(ValueError, match=r"lr: saved 0.1, now 0.2"):
    checkpoint.check_workdir_config(root, config)
  config.overwrite_config = True
  checkpoint.check_workdir_config(root, config)
  kept = [n for n in paths.listdir(root) if n.startswith("config.2")]
  assert len(kept) == 1 and paths.exists(paths.join(root, "config.json"))
  assert paths.read_json(paths.join(root, kept[0]))["lr"] == 0.1
  assert paths.read_json(paths.join(root, "config.json"))["lr"] == 0.2

  first = results_lib.write_json({"a": {"accuracy": 0.5}}, root)
  results_lib.write_json({"a": {"accuracy": 0.75}}, root)
  assert first == paths.join(root, "results.json")
  assert paths.read_json(first) == {"a": {"accuracy": 0.75}}
  assert paths.read_json(paths.join(root, "results.1.json")) == \
      {"a": {"accuracy": 0.5}}

  log = paths.LineLog(paths.join(root, "metrics.jsonl"))
  log.write('{"step": 1}')
  log.sync()
  log.write('{"step": 2}')
  log.close()
  log = paths.LineLog(paths.join(root, "metrics.jsonl"))   # a resumed run
  log.write('{"step": 2}')
  log.close()
  assert paths.read_text(paths.join(root, "metrics.jsonl")).splitlines() == \
      ['{"step": 1}', '{"step": 2}', '{"step": 2}']

  png = plots.plot_routing({"t": {"layer_0": np.array([0.25, 0.75])}},
                           ["e0", "e1"], paths.join(root, "routing.png"))
  assert paths.read_bytes(png).startswith(b"\x89PNG")
  alphas = {"a": np.eye(2), "b": np.ones((2, 2)) / 2}
  png, text = analysis.write_analysis(alphas, root, k=1)
  assert paths.read_bytes(png).startswith(b"\x89PNG")
  assert paths.read_text(paths.join(root, "head_overlap.txt")) == text + "\n"
  assert paths.read_json(paths.join(root, "head_overlap.json"))["k"] == 1
  arrays = {"t|m|idx": np.arange(6).reshape(3, 2)}
  paths.savez(paths.join(root, "choices.npz"), **arrays)
  got = np.load(io.BytesIO(paths.read_bytes(paths.join(root, "choices.npz"))))
  np.testing.assert_array_equal(got["t|m|idx"], arrays["t|m|idx"])

  emb, alpha = np.random.RandomState(0).randn(2, 3, 4), np.zeros((2, 3))
  where = si.save(paths.join(root, "task_embeddings"), "copa", emb, alpha,
                  num_shots=5)
  assert where == paths.join(root, "task_embeddings", "copa")
  e, a, meta = si.load(paths.join(root, "task_embeddings"), "copa")
  np.testing.assert_array_equal(e, emb.astype(np.float32))
  np.testing.assert_array_equal(a, alpha)
  assert meta["num_shots"] == 5

  paths.move(paths.join(root, "task_embeddings"), paths.join(root, "moved"))
  assert not paths.exists(paths.join(root, "task_embeddings"))
  assert si.load(paths.join(root, "moved"), "copa")[2] == meta


def _tiny_llama():
  return decoder.Model(decoder.config_from_hf(dict(
      model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
      pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)))




def test_libraries_adapters_and_merges_on_gcs_equal_local(gcs, tmp_path):
  model = _tiny_llama()
  base = jax.tree.map(np.asarray, nn.unbox(jax.jit(lambda k: model.init(
      k, jnp.zeros((1, 4), jnp.int32)))(jax.random.key(0))["params"]))
  method = lora_lib.LoRA(rank=2, alpha=4.0,
                         targets=(r".*self_attn/(q_proj|v_proj)",))
  shapes = jax.eval_shape(lambda: nn.unbox(method.init(jax.random.key(0),
                                                       model)))
  rs = np.random.RandomState(0)
  params = jax.tree.map(
      lambda s: (0.3 * rs.randn(*s.shape)).astype(np.float32), shapes)
  cfg = {"name": "lora", "rank": 2, "alpha": 4.0}
  root = f"gs://{BUCKET}/lib"

  # Expert library: add, list, get, stack; adapters read an expert folder.
  lib = library.Library(root)
  assert lib.root == root
  for name in ("a", "b"):
    lib.add(name, cfg, params, task=name, base_params=base)
  assert [e.name for e in lib.list()] == ["a", "b"]
  with pytest.raises(FileExistsError):
    lib.add("a", cfg, params)
  _, stacked = lib.stack(["a", "b"])
  flat = adapters.to_flat_numpy(params)
  for k, v in adapters.to_flat_numpy(stacked).items():
    np.testing.assert_array_equal(v[1], flat[k])
  loaded = adapters.load_adapter(paths.join(root, "a"))
  for k, v in adapters.to_flat_numpy(loaded).items():
    np.testing.assert_array_equal(v, flat[k])

  # The PHATGOOSE library (LoRA + gates) round trip, fingerprint checked.
  gates = transform.nest({
      k[:-len("lora_a")] + "gate": np.full(v.shape[:1], 0.5, np.float32)
      for k, v in transform.flatten(params["lora"]).items()
      if k.endswith("lora_a")})
  mem = ex.add_expert(ex.new_library(), "t0", params["lora"], gates)
  ex.save_library(mem, f"gs://{BUCKET}/phatgoose_lib", method,
                  base_params=base)
  back = ex.load_library(f"gs://{BUCKET}/phatgoose_lib", base_params=base)
  assert back["names"] == ["t0"]
  for x, y in zip(jax.tree.leaves(back["experts"][0]),
                  jax.tree.leaves(mem["experts"][0]), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # Orbax adapter checkpoint (method.json beside it).
  adapters.save_adapter(f"gs://{BUCKET}/adapter", params, cfg)
  assert paths.read_json(f"gs://{BUCKET}/adapter/method.json") == cfg
  for k, v in adapters.to_flat_numpy(
      adapters.load_adapter(f"gs://{BUCKET}/adapter")).items():
    np.testing.assert_array_equal(v, flat[k])

  # PEFT export and the merged HF folder: the same bytes as local folders;
  # the PEFT folder reads back from gs://.
  for where in (str(tmp_path / "local"), f"gs://{BUCKET}/exports"):
    library.export_peft(model, method, params, paths.join(where, "peft"))
    merging.save_merged(model, method, params, base,
                        paths.join(where, "merged"))
  for name in ("peft", "merged"):
    local = _files(tmp_path / "local" / name)
    assert local and _files(f"gs://{BUCKET}/exports/{name}") == local, name
  with pytest.raises(FileExistsError):
    merging.save_merged(model, method, params, base,
                        f"gs://{BUCKET}/exports/merged")
  options, peft_params = adapters.read_peft(f"gs://{BUCKET}/exports/peft",
                                            model)
  assert options["rank"] == 2
  for k, v in adapters.to_flat_numpy(peft_params).items():
    np.testing.assert_allclose(v, flat[k], rtol=0, atol=0)
