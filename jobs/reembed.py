"""Ray job entrypoint: the same arguments as `reembed run`.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/reembed.py \
        --input s3://corpus/docs/ --output s3://corpus/emb/bge-large/ --config job.yaml

Inside a submitted job RAY_ADDRESS points at the cluster; on a laptop a local Ray is started.
"""

import os
import sys

HERE = os.path.dirname(os.path.realpath(__file__))
# Python put this folder first on sys.path, and ray.init hands the script's folder to every worker
# (unless the job has a working_dir): a worker's `import reembed` would then load this script, not the
# package. Drop it; the package sits under src/ next to this folder (also with --working-dir .).
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != HERE]
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from reembed.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] != "run":
        argv = ["run", *argv]
    sys.exit(main(argv))
