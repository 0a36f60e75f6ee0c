"""Communication accounting: bytes actually sent, per client per round."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["RoundComm"]


@dataclass
class RoundComm:
    """Uplink and downlink bytes of one round, per sampled client (raw tensor bytes, no framing)."""

    uplink: dict[int, int] = field(default_factory=dict)  # client id -> bytes sent to the server
    downlink: dict[int, int] = field(default_factory=dict)  # client id -> bytes received after aggregation

    @property
    def total_up(self) -> int:
        return sum(self.uplink.values())

    @property
    def total_down(self) -> int:
        return sum(self.downlink.values())

    def as_dict(self) -> dict:
        return {"uplink_bytes": {str(k): v for k, v in self.uplink.items()},
                "downlink_bytes": {str(k): v for k, v in self.downlink.items()},
                "total_uplink_bytes": self.total_up, "total_downlink_bytes": self.total_down}
