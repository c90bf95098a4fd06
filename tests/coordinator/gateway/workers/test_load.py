import pytest

from meshd.coordinator.gateway.workers.load import WorkerLoad, parse

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 320.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 160.0
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="tiny"} 400.0
vllm:prompt_tokens_created{engine="0",model_name="tiny"} 1.7e9
"""


@pytest.mark.parametrize(("text", "expected"), [
    (VLLM, WorkerLoad(3, 2, 0.25, 320.0, 160.0, 0.0, 400.0, 0.0)),
    ("# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc 0.5\n",
     WorkerLoad(kv_usage=0.5)),
    ("vllm:num_requests_running{engine=\"0\"} 1\nvllm:num_requests_running{engine=\"1\"} 2\n",
     WorkerLoad(num_running=3)),
    ("", WorkerLoad()),
])
def test_parse(text: str, expected: WorkerLoad) -> None:
    assert parse(text) == expected


def test_garbage_raises_value_error() -> None:
    with pytest.raises(ValueError):
        parse("this is { not prometheus\n")
