"""The tool definitions as prompt text, for chat templates that have no place for them.

A chat template that never reads `tools` (SmolLM2's GGUF template, for one) renders a prompt
in which the model has not seen the tools it is asked to call; under a forced call's grammar
it then writes arguments blind. Such prompts get the tools in a system message instead, in
the words of the templates that do place them for Hermes tool calls (Qwen2.5's, NousResearch's
Hermes): the functions as JSON inside <tools></tools>, and the call format, one JSON object
{"name": ..., "arguments": ...} per <tool_call></tool_call> block, which is what
mistral_jax.tool_calls.hermes parses and its grammar enforces."""

from __future__ import annotations

import json

HERMES_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def hermes_tools_text(tools: list[dict]) -> str:
    """The system-prompt text that shows these OpenAI tools and the Hermes call format."""
    return HERMES_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def with_tools_message(messages: list[dict], tools_text: str) -> list[dict]:
    """messages with tools_text in the system message: after the first message's text where
    that is a system message (as the templates that place tools write it), else in a new
    system message before the others. The messages given are not changed."""
    if messages and messages[0].get("role") == "system":
        first = messages[0]
        content = first.get("content")
        if isinstance(content, list):  # OpenAI's content parts
            content = [*content, {"type": "text", "text": "\n\n" + tools_text}]
        else:
            content = f"{content}\n\n{tools_text}" if content else tools_text
        return [dict(first, content=content), *messages[1:]]
    return [{"role": "system", "content": tools_text}, *messages]
