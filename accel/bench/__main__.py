import sys

from accel.bench.harness import main

if __name__ == "__main__":
    sys.exit(main())
