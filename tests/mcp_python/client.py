#!/usr/bin/env python3
"""Drives `agentkeys mcp` with the official MCP Python SDK (`mcp` on PyPI): the second,
independent client implementation of the MCP acceptance tests (tests/mcp.rs runs this).

Usage: client.py PATH/TO/agentkeys
Environment: AGENTKEYS_HOME, AGENTKEYS_SOCKET, AGENTKEYS_TOKEN_FILE (agent of scope
github,pub), AK_CANARY (value of github, not inline), AK_INLINE (value of pub, --allow-inline),
AK_OTHER (value of prod, out of scope). Prints "OK python mcp client" when every check passed;
never prints a tool result that could hold a secret.
"""

import json
import os
import sys

import anyio
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

CANARY = os.environ["AK_CANARY"]
INLINE = os.environ["AK_INLINE"]
OTHER = os.environ["AK_OTHER"]


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)


def dump(result):
    return json.dumps(result.model_dump(mode="json", by_alias=True))


async def main(agentkeys):
    env = {
        k: os.environ[k]
        for k in ("AGENTKEYS_HOME", "AGENTKEYS_SOCKET", "AGENTKEYS_TOKEN_FILE", "PATH", "HOME", "LANG")
        if k in os.environ
    }
    params = StdioServerParameters(command=agentkeys, args=["mcp"], env=env)
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()

            tools = (await session.list_tools()).tools
            names = sorted(t.name for t in tools)
            check(names == ["get_credential", "list_credentials", "run", "whoami"], f"tools: {names}")
            run_tool = next(t for t in tools if t.name == "run")
            props = run_tool.input_schema.get("properties", {}) if hasattr(run_tool, "input_schema") else run_tool.inputSchema.get("properties", {})
            for field in ("command", "args", "env", "files", "cwd", "stdin", "timeout_secs"):
                check(field in props, f"run schema lacks {field}")

            who = await session.call_tool("whoami", {})
            check(not who.is_error if hasattr(who, "is_error") else not who.isError, "whoami failed")

            # run with an env mapping: masked output, exit code.
            r = await session.call_tool(
                "run",
                {
                    "command": "sh",
                    "args": ["-c", 'echo "token=$GH_TOKEN"; printf %s "$GH_TOKEN" >&2; exit 4'],
                    "env": {"GH_TOKEN": "github"},
                },
            )
            whole = dump(r)
            check(CANARY not in whole, "secret in the run result")
            s = r.structured_content if hasattr(r, "structured_content") else r.structuredContent
            check(s["exit_code"] == 4, f"exit code {s['exit_code']}")
            check("token=********" in s["stdout"], "stdout not masked as expected")
            check("********" in s["stderr"], "stderr not masked as expected")

            # get_credential on a non-inline service without fd support: error, no secret byte.
            r = await session.call_tool("get_credential", {"service": "github"})
            whole = dump(r)
            check(r.is_error if hasattr(r, "is_error") else r.isError, "github was delivered")
            check(CANARY not in whole and CANARY[:12] not in whole, "secret in the error result")

            # --allow-inline service: its value.
            r = await session.call_tool("get_credential", {"service": "pub"})
            s = r.structured_content if hasattr(r, "structured_content") else r.structuredContent
            check(s is not None and s.get("value") == INLINE, "inline value not returned")

            # Out of scope: error results (audited deny, checked by the Rust side).
            for name, args in (
                ("get_credential", {"service": "prod"}),
                ("run", {"command": "sh", "args": ["-c", "echo $X"], "env": {"X": "prod"}}),
            ):
                r = await session.call_tool(name, args)
                check(r.is_error if hasattr(r, "is_error") else r.isError, f"{name} out of scope succeeded")
                check(OTHER not in dump(r), "out-of-scope value in the result")

    print("OK python mcp client")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
