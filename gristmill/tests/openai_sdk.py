"""Drives a Gristmill coordinator with the official OpenAI Python SDK, unchanged.

Run by gristmill/tests/cluster.rs with OPENAI_BASE_URL and OPENAI_API_KEY pointing at a test
cluster that has one worker on the default model. Prints ALL OK when every check passed.
"""

import io
import json
import time

import openai
from openai import OpenAI

client = OpenAI(timeout=60, max_retries=0)


def lines(prefix, n, max_tokens=4):
    return "\n".join(
        json.dumps(
            {
                "custom_id": f"{prefix}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "SmolLM2-135M-Instruct",
                    "messages": [{"role": "user", "content": f"Name a colour ({i})."}],
                    "max_tokens": max_tokens,
                    "seed": i,
                },
            }
        )
        for i in range(n)
    ).encode()


# files.create / retrieve / list
f = client.files.create(file=("batch.jsonl", io.BytesIO(lines("sdk", 3))), purpose="batch")
assert f.object == "file" and f.purpose == "batch" and f.bytes > 0, f
assert f.filename == "batch.jsonl", f
assert client.files.retrieve(f.id).id == f.id
assert any(x.id == f.id for x in client.files.list().data)
assert any(x.id == f.id for x in client.files.list(purpose="batch").data)

# batches.create / retrieve until done
b = client.batches.create(
    input_file_id=f.id,
    endpoint="/v1/chat/completions",
    completion_window="24h",
    metadata={"project": "sdk-test"},
)
assert b.object == "batch" and b.status in ("validating", "in_progress"), b
assert b.metadata == {"project": "sdk-test"}, b.metadata
deadline = time.time() + 180
while b.status not in ("completed", "failed", "expired", "cancelled"):
    assert time.time() < deadline, f"batch stuck in {b.status}"
    time.sleep(0.5)
    b = client.batches.retrieve(b.id)
assert b.status == "completed", b
assert b.request_counts.total == 3 and b.request_counts.completed == 3, b.request_counts
assert b.completed_at and b.in_progress_at and b.finalizing_at, b
assert b.error_file_id is None

# files.content of the output, in OpenAI's batch output format
text = client.files.content(b.output_file_id).text
out = [json.loads(l) for l in text.splitlines()]
assert sorted(o["custom_id"] for o in out) == ["sdk-0", "sdk-1", "sdk-2"], out
for o in out:
    assert o["response"]["status_code"] == 200
    body = o["response"]["body"]
    assert body["object"] == "chat.completion", body
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] <= 4
assert client.files.retrieve(b.output_file_id).purpose == "batch_output"

# structured outputs: response_format with a JSON Schema, as the SDK's users write it
schema = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}},
    "required": ["colour", "hex"],
    "additionalProperties": False,
}
so_lines = "\n".join(
    json.dumps(
        {
            "custom_id": f"json-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "SmolLM2-135M-Instruct",
                "messages": [{"role": "user", "content": f"Pick a colour ({i}) as JSON."}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "colour", "strict": True, "schema": schema}},
                "max_tokens": 40,
                "seed": i,
            },
        }
    )
    for i in range(3)
).encode()
fs = client.files.create(file=("so.jsonl", io.BytesIO(so_lines)), purpose="batch")
bs = client.batches.create(input_file_id=fs.id, endpoint="/v1/chat/completions", completion_window="24h")
deadline = time.time() + 180
while bs.status not in ("completed", "failed", "expired", "cancelled"):
    assert time.time() < deadline, f"batch stuck in {bs.status}"
    time.sleep(0.5)
    bs = client.batches.retrieve(bs.id)
assert bs.status == "completed" and bs.request_counts.completed == 3, bs
for l in client.files.content(bs.output_file_id).text.splitlines():
    choice = json.loads(l)["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    parsed = json.loads(choice["message"]["content"])
    assert parsed["colour"] in ("red", "green", "blue") and len(parsed["hex"]) == 7, parsed

# batches.list with pagination
f2 = client.files.create(file=("b2.jsonl", io.BytesIO(lines("slow", 40, 64))), purpose="batch")
b2 = client.batches.create(input_file_id=f2.id, endpoint="/v1/chat/completions", completion_window="24h")
page = client.batches.list(limit=1)
assert len(page.data) == 1 and page.has_more, page
ids = [x.id for x in client.batches.list(limit=1)]  # iterating a page fetches the next ones
assert b.id in ids and b2.id in ids, ids

# batches.cancel
c = client.batches.cancel(b2.id)
assert c.status in ("cancelling", "cancelled"), c
deadline = time.time() + 60
while c.status != "cancelled":
    assert time.time() < deadline, f"cancel stuck in {c.status}"
    time.sleep(0.5)
    c = client.batches.retrieve(b2.id)
assert c.request_counts.completed + c.request_counts.failed == 40, c.request_counts
errs = [json.loads(l) for l in client.files.content(c.error_file_id).text.splitlines()]
assert all(e["error"]["code"] in ("batch_cancelled",) for e in errs), errs[:3]

# errors come back as the SDK's exception types
try:
    client.batches.retrieve("batch_does_not_exist")
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.status_code == 404
try:
    client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    raise AssertionError("expected BadRequestError")
except openai.BadRequestError as e:
    assert e.body["param"] == "endpoint", e.body
try:
    OpenAI(api_key="wrong", max_retries=0).batches.list()
    raise AssertionError("expected AuthenticationError")
except openai.AuthenticationError as e:
    assert e.status_code == 401

# files.delete
d = client.files.delete(f.id)
assert d.deleted and d.id == f.id, d
try:
    client.files.retrieve(f.id)
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError:
    pass

print("ALL OK")
