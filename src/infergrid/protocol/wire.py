"""What a miner adds to the OpenAI wire format, and the headers gateway and miner share.

A miner answers `/v1/chat/completions` and `/v1/completions` exactly as OpenAI does, plus one
top-level extension object under EXTENSION_KEY that verification needs. The gateway always
strips it before a response reaches a client.

Non-streamed response, `body[EXTENSION_KEY]`::

    {"model_id": "0x…", "sampler": "gumbel-splitmix64-v1", "seed": 123,
     "prompt_token_ids": [...], "output_token_ids": [...], "output_logprobs": [...]}

`sampler` names the protocol sampler's version (protocol.sampling.SAMPLER_VERSION) the tokens
were drawn with; the miner's /health names it per model too.

Streamed response: every chunk that carries content also carries
`{"token_ids": [...], "logprobs": [...]}` for the tokens in that chunk (a token whose text is
not complete yet, such as half of a multi-byte character, rides in the next chunk; the
finish_reason chunk carries whatever is left, typically the EOS token); the miner always ends
with a usage chunk (`choices: []`, `usage`), whether or not the client asked for
`stream_options.include_usage`, whose extension is
`{"model_id": "0x…", "sampler": "…", "seed": 123, "prompt_token_ids": [...]}`. Then `data: [DONE]`.

With settlement on, the non-streamed extension and the usage chunk's extension also carry
`"attestation": {<protocol.messages.Attestation JSON>, "signature": "0x…"}`, signed by the
miner's registered signer key; the gateway checks it before it charges anything.

`output_logprobs[i]` is the natural log of the model's probability (before temperature) of
the token it emitted at step i.

Output token ids include the token that ended the generation: the EOS token (no text), or
the token that completed a stop sequence (the text is cut before the stop sequence). The
text is `decode(output_token_ids)` with special tokens skipped, so cut. Tokens are drawn by
infergrid.protocol.sampling with the extension's seed.
"""

from __future__ import annotations

EXTENSION_KEY = "infergrid"

# The gateway names each request; the miner uses it as the completion id so the two agree.
REQUEST_ID_HEADER = "x-request-id"
# Which InferGrid node answered (its registry owner address).
MINER_HEADER = "x-infergrid-miner"

# Who pays for a request and which gateway signer will sign its receipt; the miner keeps them
# in its own receipt log to check the vouchers it is later given.
PAYER_HEADER = "x-infergrid-payer"
GATEWAY_HEADER = "x-infergrid-gateway"
ATTESTATION_KEY = "attestation"

# On every completion response of a gateway (plain, streamed and errors once the request has an
# id): where its verification status is, `/v1/requests/<request id>` (relative to the gateway).
REQUEST_STATUS_HEADER = "x-infergrid-request"

SSE_DONE = b"data: [DONE]\n\n"


def request_status_path(request_id: str) -> str:
    """The value of REQUEST_STATUS_HEADER for a request."""
    return "/v1/requests/" + request_id


def completion_id(request_id: str, *, chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + request_id
