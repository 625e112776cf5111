# A code node: `n` is an input (sandbox run examples/hello.py --input n=5).
# Every top-level variable it binds is an output.
import math

squares = [i * i for i in range(n)]
total = sum(squares)
await asyncio.sleep(0.01)  # top-level await works; asyncio needs no import
result = {"n": n, "total": total, "sqrt_total": math.sqrt(total)}
print(f"summed {n} squares")
