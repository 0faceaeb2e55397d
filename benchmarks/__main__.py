"""``python -m benchmarks list`` and ``python -m benchmarks run NAME [flags]``."""

from __future__ import annotations

import sys

import benchmarks

USAGE = """usage: python -m benchmarks list
       python -m benchmarks run NAME [flags]   (run NAME --help: its flags)"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["list"] and len(argv) == 1:
        for bench in benchmarks.load_all().values():
            where = "GPU" if bench.gpu else "CPU"
            print(f"{bench.name:<18} {where}  {bench.summary}")
        return 0
    if argv[:1] == ["run"] and len(argv) >= 2:
        try:
            bench = benchmarks.get(argv[1])
        except KeyError:
            names = ", ".join(benchmarks.module_names())
            print(f"benchmarks: error: no benchmark {argv[1]!r} (one of: {names})",
                  file=sys.stderr)
            return 2
        bench.run(argv[2:])
        return 0
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
