"""Any registered rule as a Flower strategy, with the round loop's own pieces and numbers.

Per round ``t`` (0-based; Flower's ``server_round`` is ``t + 1``), exactly as ``fedlora.loop``:
sample the clients with ``sample_clients(cfg, t)``; send each its task from ``make_task`` (the rule's
``client_view``: FlexLoRA's rank-r_k view, FLoRA's fresh adapter on the merged stack, ...), leaving out
the tensors its node already holds from its last task (by digest, ``fedlora.flower.wire``); take the
replies into a ``RoundServer`` in client order (validated as the core does; a malformed reply is
dropped, logged with its node id, never merged), aggregate, write ``round_record``'s history entry,
evaluate, and checkpoint with ``save_round``. So the global state and the byte counts equal
``run_federated``'s on the same seed and partition.

Clients are nodes: a node's ``partition-id`` is its client id, learned by a ``query`` message when it
connects (``fedlora.flower.client_app`` answers it). A client whose node is absent, fails, or does not
reply in ``round_timeout`` is dropped for the round and recorded in ``rejected`` with why; when fewer
than ``min_replies`` clients are accepted the global is kept for that round and the record says why.
Replies are matched to clients by the id of the message they answer (``reply_to_message_id``): an error
the SuperLink answers for a node (Flower's "Node Unavailable" after a SuperNode died) carries the
SuperLink's id as its source, not the node's, and is recorded with its own reason.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from ..aggregators import get_rule
from ..checkpoint import state_to_tensors
from ..comm import RoundComm
from ..config import ConfigError, FedConfig
from ..loop import RoundServer, RunResult, State, make_task, resume_run, round_record, sample_clients, save_round
from ..validation import UpdateError
from .wire import QUERY, TRAIN, decode_result, encode_task, payload_bytes

__all__ = ["FedLoraStrategy", "state_record", "RunFailed"]

log = logging.getLogger(__name__)

_RAISED, _NODE_UNAVAILABLE = 2, 5  # flwr.common.constant.ErrorCode


class RunFailed(RuntimeError):
    """The run could not do what it was asked (no node for any client, no round accepted): a ServerApp
    raises it so that Flower records the run as failed (``flwr ls``)."""


def _error_reason(err) -> str:
    """A Flower error reply as a drop reason."""
    if err.code == _RAISED:
        return f"training failed on the node: {err.reason}"
    if err.code == _NODE_UNAVAILABLE:
        return f"the node became unavailable (Flower error {err.code}: {err.reason})"
    return f"Flower error {err.code}: {err.reason}"


def state_record(state: State) -> ArrayRecord:
    """The tensors of a state as one ``ArrayRecord`` (what ``Strategy.start`` reports as ``arrays``)."""
    return ArrayRecord({k: t.contiguous() for k, t in state_to_tensors(state)[0].items()})


class FedLoraStrategy(Strategy):
    """Run ``cfg.rule`` for ``cfg.rounds`` rounds on Flower nodes; ``run(grid)`` returns a ``RunResult``.

    ``init``, ``evaluate``, ``client_ranks``/``client_scales``, ``checkpoint_dir``/``resume`` and
    ``run_info`` mean what they mean in ``fedlora.loop.run_federated``; replies are always dropped, never
    fatal, when malformed (``on_bad_update="drop"``). ``min_replies``: the fewest accepted clients for a
    round to change the global. ``connect_timeout``: how long to wait, at the start, for a node per
    client to connect (in a simulation, whose nodes all exist from the start, the wait ends as soon as
    every node has answered). ``on_round(record)`` is called with each round's history record as the
    round ends (``record["resumed"]`` is absent; ``self.resumed_from`` is the first round of a resumed run).
    """

    def __init__(self, *, cfg: FedConfig, init: State,
                 evaluate: Optional[Callable[[int, State], Mapping[str, float]]] = None,
                 client_ranks: Optional[Sequence[int]] = None, client_scales: Optional[Sequence[float]] = None,
                 min_replies: int = 1, round_timeout: float = 600.0, connect_timeout: float = 60.0,
                 checkpoint_dir: Optional[Path] = None, resume: bool = False,
                 run_info: Optional[Mapping] = None, on_round: Optional[Callable[[dict], None]] = None,
                 fingerprint: Optional[Mapping] = None) -> None:
        self.cfg, self.rule = cfg, get_rule(cfg.rule)
        if self.rule.chain:
            raise ConfigError(f"rule={cfg.rule!r} trains the clients one after another, each from the previous "
                              "client's result; Flower nodes train in parallel. Run it in-process with "
                              "fedlora.loop.run_federated, or choose an independent rule")
        for name, v in (("round_timeout", round_timeout), ("connect_timeout", connect_timeout)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(f"{name}={v!r}; must be a number of seconds >= 0")
        if not 1 <= min_replies <= cfg.sampled_per_round():
            raise ConfigError(f"min_replies={min_replies}; need 1 <= min_replies <= {cfg.sampled_per_round()} "
                              "(the clients sampled per round)")
        for name, seq in (("client_ranks", client_ranks), ("client_scales", client_scales)):
            if seq is not None and len(seq) != cfg.num_clients:
                raise ConfigError(f"{name} has {len(seq)} entries for {cfg.num_clients} clients; give one per client")
        self.evaluate, self.client_ranks, self.client_scales = evaluate, client_ranks, client_scales
        self.min_replies, self.round_timeout, self.connect_timeout = min_replies, round_timeout, connect_timeout
        self.checkpoint_dir, self.run_info = (Path(checkpoint_dir) if checkpoint_dir else None), run_info
        self.fingerprint = fingerprint  # the app's run settings: a resume with other ones is refused
        self.on_round = on_round
        self.state, self.history, self.start_round, self.resumed_from = dict(init), [], 0, None
        if self.checkpoint_dir is not None and resume:
            loaded = resume_run(self.checkpoint_dir, cfg, fingerprint=fingerprint)
            if loaded is not None:
                self.state, self.history, self.start_round, _ = loaded  # client_state lives on the nodes
                self.resumed_from = self.start_round
        self.client_node: dict[int, int] = {}  # client id (partition-id) -> Flower node id
        self._asked: set[int] = set()  # nodes that answered the query (a node is asked once, not polled)
        self.wire: list[dict] = []  # per round: bytes as Flower serialised them, per client ("down", "up")
        self._sent: dict[int, tuple[int, State]] = {}  # this round: client -> (node, the view it was sent)
        self._msgs: dict[int, Message] = {}  # this round: client -> its message (its id is set when pushed)
        self._held: dict[int, dict[str, str]] = {}  # client -> digest per tensor of the view its node keeps
        self._absent: list[dict] = []

    # --- nodes ----------------------------------------------------------------------------------
    def discover(self, grid: Grid, *, wait: bool) -> set[int]:
        """Ask every node not yet asked for its partition-id; with ``wait``, until every client has a
        node or ``connect_timeout`` passes (in a simulation, until every node has answered: no node joins
        later). A node is asked once: one that answered without a usable partition-id is not asked again
        (each question starts a ClientApp process on the node). A node that re-registers (a restarted
        SuperNode has a new id) replaces the old one for its partition. Returns the connected node ids."""
        deadline = time.monotonic() + (self.connect_timeout if wait else 0.0)
        simulation = type(grid).__name__ == "InMemoryGrid"
        while True:
            nodes = set(grid.get_node_ids())
            new = sorted(nodes - self._asked)
            if new:
                msgs = [Message(RecordDict(), dst_node_id=n, message_type=QUERY, group_id="connect") for n in new]
                for reply in grid.send_and_receive(msgs, timeout=min(60.0, self.round_timeout)):
                    self._register(reply, msgs)
            if len(self.client_node) >= self.cfg.num_clients or time.monotonic() >= deadline:
                break
            if simulation and nodes and nodes <= self._asked:
                break
            time.sleep(0.5)
        missing = sorted(set(range(self.cfg.num_clients)) - set(self.client_node))
        if wait and missing:
            log.warning("no node holds partition-id %s after the connect wait (connect-timeout %g s); those "
                        "clients miss their rounds. Start one SuperNode per client with --node-config "
                        "\"partition-id=K num-partitions=%d\" (simulation: num-supernodes=%d)",
                        missing, self.connect_timeout, self.cfg.num_clients, self.cfg.num_clients)
        return nodes

    def _register(self, reply: Message, sent: Sequence[Message]) -> None:
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        node = asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        self._asked.add(node)
        if reply.has_error():
            log.warning("node %d did not say which partition it holds: %s", node, reply.error.reason)
            return
        pid = reply.content["node"]["partition-id"]
        if not isinstance(pid, int) or not 0 <= pid < self.cfg.num_clients:
            log.warning("node %d holds partition-id %r outside [0, %d); it is not used (set num_clients "
                        "or the node's partition-id)", node, pid, self.cfg.num_clients)
            return
        if pid in self.client_node:
            log.warning("node %d now holds partition %d (was node %d)", node, pid, self.client_node[pid])
        self.client_node[pid] = node
        self._held.pop(pid, None)  # a new node holds nothing yet

    # --- one round --------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One message per sampled client that has a node: its task, built by the rule's view."""
        t = server_round - 1
        self._sent, self._absent, self._msgs = {}, [], {}
        down: dict[int, int] = {}
        msgs = []
        online = set(grid.get_node_ids()) if grid is not None else None
        for c in sample_clients(self.cfg, t):
            node = self.client_node.get(c)
            if node is None:
                self._absent.append({"client": c, "node": None, "error": f"no node with partition-id {c} is connected"})
                continue
            if online is not None and node not in online:
                self._absent.append({"client": c, "node": node,
                                     "error": f"its node {node} left the federation (no SuperNode holds partition {c} now)"})
                self._held.pop(c, None)
                continue
            task = make_task(self.rule, self.cfg, self.state, client=c, round_=t, rank=self._rank(c),
                             scale=self._scale(c), local={})
            content, self._held[c] = encode_task(task, held=self._held.get(c))
            down[c] = payload_bytes(content)
            self._sent[c] = (node, task.start)
            msgs.append(Message(content, dst_node_id=node, message_type=TRAIN, group_id=str(t)))
            self._msgs[c] = msgs[-1]
        self.wire.append({"round": t, "down": down, "up": {}})
        return msgs

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Validate and aggregate in client order (the loop's order, so the sums match bit for bit)."""
        t = server_round - 1
        replies = list(replies)
        by_id = {m.metadata.reply_to_message_id: m for m in replies if m.metadata.reply_to_message_id}
        server = RoundServer(self.rule, self.state, self.cfg, t, "drop", self.client_ranks, self.client_scales,
                             fold=self.rule.linear)
        dropped = list(self._absent)
        for c in sorted(self._sent):
            node, start = self._sent[c]
            msg = by_id.get(self._msgs[c].metadata.message_id) if c in self._msgs else None
            why = None
            if msg is None:
                why = f"no reply within {self.round_timeout:g} s"
            elif msg.has_error():
                why = _error_reason(msg.error)
            if why is not None:
                self._held.pop(c, None)  # it may not hold this view: send it whole next time
                dropped.append({"client": c, "node": node, "error": why})
                continue
            self.wire[-1]["up"][c] = payload_bytes(msg.content)
            try:
                res = decode_result(msg.content, client=c, round_=t, start=start)
            except UpdateError as err:
                server.rejected.append({"client": c, "error": str(err)})
                continue
            server.add(c, res)
        skipped, aggs = None, {}
        if len(server.kept) < self.min_replies:
            skipped = (f"only {len(server.kept)} of {len(self._sent) + len(self._absent)} sampled clients were accepted, "
                       f"fewer than min_replies={self.min_replies}; the global state is kept for this round")
        else:
            try:
                new, aggs = server.finish()
            except UpdateError as err:  # every upload was refused while aggregating
                skipped = f"{err}; the global state is kept for this round"
            else:
                self.state = new
        record = self._record(server, aggs, skipped, dropped)
        for e in record["rejected"]:
            log.warning("round %d: dropped client %s (node %s): %s", t, e["client"], e["node"], e["error"])
        if skipped:
            log.warning("round %d: %s", t, skipped)
        self._finish_round(t, record)
        return state_record(self.state), MetricRecord(record["train"]) if record["train"] else None

    def _record(self, server: RoundServer, aggs: Mapping, skipped: Optional[str], dropped: list[dict]) -> dict:
        if skipped is None:
            record = round_record(self.rule, server, aggs, rank_of=self._rank)
        else:
            record = {"round": server.t, "clients": [], "trains": server.trains, "train": {},
                      "rejected": server.rejected, **RoundComm().as_dict(), "skipped": skipped}
        node_of = {c: n for c, (n, _) in self._sent.items()}
        rejected = [{**e, "node": node_of.get(e["client"])} for e in server.rejected]
        record["rejected"] = sorted(dropped + rejected, key=lambda e: e["client"])
        return record

    def _finish_round(self, t: int, record: dict) -> None:
        """Evaluate, append to the history and checkpoint, on the loop's schedule."""
        cfg = self.cfg
        last = t == cfg.rounds - 1
        if self.evaluate is not None and ((t + 1) % cfg.eval_every == 0 or last):
            record["eval"] = {k: float(v) for k, v in self.evaluate(t, self.state).items()}
        self.history.append(record)
        if self.checkpoint_dir is not None and ((t + 1) % cfg.checkpoint_every == 0 or last):
            save_round(self.checkpoint_dir, cfg, state=self.state, round_done=t, history=self.history,
                       client_state={}, run_info={**(self.run_info or {}), "engine": "flower",
                                                  "fingerprint": self.fingerprint})
        if self.on_round is not None:
            self.on_round(record)

    def _rank(self, c: int) -> Optional[int]:
        return self.client_ranks[c] if self.client_ranks is not None else None

    def _scale(self, c: int) -> Optional[float]:
        return self.client_scales[c] if self.client_scales is not None else None

    # --- the run ----------------------------------------------------------------------------------
    def run(self, grid: Grid, *, stop_after: Optional[int] = None) -> RunResult:
        """Every remaining round (from the checkpoint when resumed); ``stop_after`` ends after that many."""
        self.summary()
        if self.start_round >= self.cfg.rounds:
            return RunResult(state=dict(self.state), history=self.history)  # the checkpoint is of a finished run
        self.discover(grid, wait=True)
        if not self.client_node:
            raise RunFailed(f"no node holds any partition-id in [0, {self.cfg.num_clients}) after the connect wait "
                            f"({self.connect_timeout:g} s): start one SuperNode per client with --node-config "
                            f"\"partition-id=K num-partitions={self.cfg.num_clients}\" (simulation: "
                            f"num-supernodes={self.cfg.num_clients}), or raise connect-timeout")
        for i, t in enumerate(range(self.start_round, self.cfg.rounds)):
            if stop_after is not None and i >= stop_after:
                break
            self.discover(grid, wait=False)
            msgs = list(self.configure_train(t + 1, ArrayRecord(), ConfigRecord(), grid))
            replies = grid.send_and_receive(msgs, timeout=self.round_timeout) if msgs else []
            self.aggregate_train(t + 1, replies)
        return RunResult(state=dict(self.state), history=self.history)

    def start(self, grid: Grid, initial_arrays: Optional[ArrayRecord] = None, num_rounds: Optional[int] = None,
              timeout: Optional[float] = None, train_config: Optional[ConfigRecord] = None,
              evaluate_config: Optional[ConfigRecord] = None, evaluate_fn=None) -> Result:
        """Flower's entry point: ``run(grid)``, reported as a Flower ``Result``. The initial state is
        ``init`` (an ``ArrayRecord`` cannot carry LoRA scales and bases), the rounds ``cfg.rounds``."""
        if initial_arrays is not None or evaluate_fn is not None:
            raise ConfigError("FedLoraStrategy takes its initial state as init= and its evaluation as evaluate= "
                              "in the constructor; call start(grid=grid)")
        if num_rounds is not None and num_rounds != self.cfg.rounds:
            raise ConfigError(f"num_rounds={num_rounds} but cfg.rounds={self.cfg.rounds}; set the rounds in the config")
        if timeout is not None:
            self.round_timeout = timeout
        res = self.run(grid)
        out = Result(arrays=state_record(res.state))
        for h in res.history:
            if h["train"]:
                out.train_metrics_clientapp[h["round"] + 1] = MetricRecord(h["train"])
            if "eval" in h:
                out.evaluate_metrics_serverapp[h["round"] + 1] = MetricRecord(h["eval"])
        return out

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # the global is evaluated on the server (evaluate=), as in the in-process loop

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        return None

    def summary(self) -> None:
        log.info("fedlora strategy: rule %s (%s), %d rounds, %d clients, %d per round, min_replies %d, from round %d%s",
                 self.rule.name, self.rule.paper, self.cfg.rounds, self.cfg.num_clients,
                 self.cfg.sampled_per_round(), self.min_replies, self.start_round,
                 f" (resumed from {self.checkpoint_dir})" if self.resumed_from is not None else "")

    def failure(self) -> Optional[str]:
        """Why the finished run failed (no round changed the global), or ``None``."""
        done = self.history[self.start_round:] if self.resumed_from is not None else self.history
        if done and all("skipped" in h for h in done):
            return (f"every round was skipped ({done[-1]['skipped']}); the global state is the initial one. "
                    "See each round's 'rejected' for why the clients were dropped")
        return None
