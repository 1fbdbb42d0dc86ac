"""Ray job entrypoint: the same arguments as `reembed run`.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/reembed.py \
        --input s3://corpus/docs/ --output s3://corpus/emb/bge-large/ --config job.yaml

Inside a submitted job RAY_ADDRESS points at the cluster; on a laptop a local Ray is started.
"""

import os
import sys

# Submitted with --working-dir . the package sits under src/ next to this file.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from reembed.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] != "run":
        argv = ["run", *argv]
    sys.exit(main(argv))
