#!/usr/bin/env python3
"""Drives `agentkeys mcp`'s `run` tool with a `proxy` mapping through the official MCP Python
SDK (tests/proxy.rs runs this).

Usage: proxy_client.py PATH/TO/agentkeys
Environment: AGENTKEYS_HOME, AGENTKEYS_SOCKET, AGENTKEYS_TOKEN_FILE (agent of scope gh),
AK_VALUE (gh's value, injected by the proxy), AK_URL (an echoing https URL that gh may go to).
Prints "OK python mcp proxy client" when every check passed; never prints a tool result.
"""

import json
import os
import sys

import anyio
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

VALUE = os.environ["AK_VALUE"]
URL = os.environ["AK_URL"]


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)


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
            run_tool = next(t for t in tools if t.name == "run")
            schema = run_tool.input_schema if hasattr(run_tool, "input_schema") else run_tool.inputSchema
            check("proxy" in schema.get("properties", {}), "run schema lacks proxy")
            r = await session.call_tool(
                "run",
                {
                    "command": "sh",
                    "args": ["-c", f'curl -s -H "Authorization: Bearer $GH" {URL}'],
                    "proxy": {"GH": "gh"},
                },
            )
            whole = json.dumps(r.model_dump(mode="json", by_alias=True))
            check(VALUE not in whole, "the value is in the run result")
            s = r.structured_content if hasattr(r, "structured_content") else r.structuredContent
            check(s["exit_code"] == 0, f"exit code {s['exit_code']}")
            check("akph_" not in s["stdout"] and "****" in s["stdout"], "the echoed header is not masked")
    print("OK python mcp proxy client")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
