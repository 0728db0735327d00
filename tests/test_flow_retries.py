"""Prefect task retries: transient failures are retried with backoff, user errors and NaN stops are not."""
from prefect.states import Failed

from flows.pipeline import _transient, stage_task
from kdpipe.config import ConfigError
from kdpipe.data import DataError
from kdpipe.pipeline import StageFailed


def test_retry_only_transient_failures():
    assert _transient(None, None, Failed(data=OSError("connection refused: http://mlflow:5000")))
    assert _transient(None, None, Failed(data=StageFailed("'dvc repro --single-item distill' failed")))
    for err in (ConfigError("unknown key 'distill.x'"), DataError("data.root missing"), FloatingPointError("nan")):
        assert not _transient(None, None, Failed(data=err))


def test_stage_task_retry_policy():
    assert stage_task.retries == 2
    delays = stage_task.retry_delay_seconds
    assert len(delays) == 2 and delays[1] == 2 * delays[0]  # exponential backoff
    assert stage_task.retry_jitter_factor == 0.5
