"""Chat dialects: one internal message model that OpenAI chat, Anthropic Messages and OpenAI
Responses translate to and from, so a tool-call chain started in one continues in another.
Pure: no I/O, no HTTP, no asyncio; parsers raise `meshd.api_errors.ApiError(400)`.

    model          the internal model: blocks, turns, conversation, tools, completion, usage
    fields         readers for one field of a body: type and range checks naming the JSON path
    chain          `TurnBuilder`: messages grouped into turns, the tool-call chain checked
    template       a conversation as Hugging Face chat-template messages and tools
    openai_chat    OpenAI chat messages/tools <-> the model; the chat response message
    anthropic      Anthropic Messages request validation into `MessagesRequest`
    anthropic_out  Anthropic responses, stream events, error bodies and request bodies
    responses      OpenAI Responses request validation, `previous_response_id` continuation
    responses_out  Responses objects, stream events and request bodies

Imports: `model` imports nothing of the package; `fields` and `chain` import `model`; the
dialect modules import those three; `responses_out` imports `responses`.
"""
