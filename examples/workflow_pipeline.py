"""A four-node workflow: two fetches run side by side, then a join, then a report.

Run it with ``python examples/workflow_pipeline.py`` (after ``pip install .``).
Every node's code runs in a confined worker under the default policy; only
data travels between nodes.
"""

import uvloop

from sandbox import Sandbox, Workflow, WorkflowBuilder, WorkflowError

FETCH_ORDERS = """
async def load(region):
    if region not in ("EU", "US"):
        raise ValueError(f"no orders feed for region {region!r}")
    await asyncio.sleep(0.2)  # stands in for a slow API call
    return [{"customer": c, "amount": a} for c, a in ((1, 120.0), (2, 80.5), (1, 42.0))]

orders = await load(region)
result = {"data": orders, "count": len(orders)}
"""

FETCH_CUSTOMERS = """
await asyncio.sleep(0.2)
customers = {1: "Ada", 2: "Grace"}
"""

JOIN = """
rows = [{**order, "name": names[order["customer"]]} for order in orders]
item_count = len(rows)
total_value = round(sum(row["amount"] for row in rows), 2)
"""

REPORT = """
lines = [title, "-" * len(title)]
lines += [f"{row['name']:<8}{row['amount']:>8.2f}" for row in rows]
lines.append(f"total {total:>11.2f}")
report = "\\n".join(lines)
"""


def build_pipeline() -> Workflow:
    wf = WorkflowBuilder()
    wf.add_node("AsyncPythonCodeNode", "orders", {"code": FETCH_ORDERS, "region": "${region}"})
    wf.add_node("AsyncPythonCodeNode", "customers", {"code": FETCH_CUSTOMERS})
    wf.add_node("PythonCodeNode", "join", {"code": JOIN})
    wf.add_node("PythonCodeNode", "report", {"code": REPORT, "title": "Report: ${count} orders"})
    wf.add_connection("orders", "result.data", "join", "orders")
    wf.add_connection("customers", "customers", "join", "names")
    wf.add_connection("join", "rows", "report", "rows")
    wf.add_connection("join", "item_count", "report", "count")
    wf.add_connection("join", "total_value", "report", "total")
    return wf.build()


async def main() -> None:
    pipeline = build_pipeline()
    async with Sandbox(workers=2) as sb:
        results = await sb.run_workflow(pipeline, parameters={"orders": {"region": "EU"}}, timeout=10)
        print(results["report"]["report"])

        try:
            await sb.run_workflow(pipeline, parameters={"orders": {"region": "Mars"}})
        except WorkflowError as error:
            # The other nodes still running were stopped; error.completed holds
            # the outputs of any that had finished.
            print(f"\nfailed at node {error.node!r}: {error.cause.message}")


if __name__ == "__main__":
    uvloop.run(main())
