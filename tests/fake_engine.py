"""A RolloutEngine that only generates (scripted by each test); weights and memory calls are no-ops."""
from __future__ import annotations

from r1mega.rollout.engine import RolloutEngine


class GenerateOnlyEngine(RolloutEngine):
    def prompt_logprobs(self, token_ids):
        raise NotImplementedError

    def update_weights(self, named_tensors):
        raise NotImplementedError

    def sleep(self, level=1):
        pass

    def wake_up(self, tags=None):
        pass

    def shutdown(self):
        pass
