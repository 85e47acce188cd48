"""The learner: replay buffer (storage, sampler, writer), the soft-Q learner and its service.

>>> from learner import ReplayBuffer, SoftQConfig, SoftQLearner
>>> SoftQConfig().gamma, SoftQConfig().top_k
(0.5, 64)
"""

from learner.buffer import ReplayBuffer
from learner.loop import TrainingLoop
from learner.sampler import PrioritizedSampler, Sampler, UniformSampler
from learner.storage import ArrayStorage, ReplayBatch, ReplayTransition, Storage
from learner.trainer import SoftQConfig, SoftQLearner, UnhealthyLearnerError
from learner.writer import RingWriter, Writer

__all__ = [
    "ReplayBuffer", "ReplayTransition", "ReplayBatch", "Storage", "ArrayStorage", "Sampler",
    "UniformSampler", "PrioritizedSampler", "Writer", "RingWriter", "SoftQConfig", "SoftQLearner",
    "UnhealthyLearnerError", "TrainingLoop",
]
