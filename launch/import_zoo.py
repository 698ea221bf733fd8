r"""Import a public model zoo into wa's zoo store (``wa.zoo.imports``), so that ``launch.probe`` and
``experiments/nwa_benchmark.py`` read it as they read a zoo wa built.

  python -m launch.import_zoo --format small_cnn_zoo --src DIR --workdir runs/smallcnn_fmnist \
      --split nfn/experiments/predict_gen_data_splits/fashion_mnist_split.csv

DIR holds the Small CNN Zoo's released weights.npy, metrics.csv.gz and layout.csv (one data set's folder).
Writes <workdir>/zoo; everything is checked before anything is written, and a failed import leaves no zoo.
"""

from absl import flags

from launch import common
from wa.zoo import imports

flags.DEFINE_enum("format", None, sorted(imports.FORMATS), "The zoo's file format.")
flags.DEFINE_string("src", None, "Folder holding the zoo's released files.")
flags.DEFINE_string("workdir", None, "Run folder; the store goes to <workdir>/zoo.")
flags.DEFINE_string("split", "", "small_cnn_zoo: NFN's split file (predict_gen_data_splits/<data set>_split.csv), "
                    "stored as metadata column nfn_split.")
flags.mark_flags_as_required(["format", "src", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    common.start()
    zoo = imports.run(FLAGS.format, FLAGS.src, FLAGS.workdir, FLAGS.split)
    final = zoo.final()
    acc = final["test_acc"]
    print(f"{len(final)} models, {len(zoo.metadata)} checkpoints imported into {zoo.path}; final test accuracy "
          f"median {acc.median():.3f} (5%-95%: {acc.quantile(0.05):.3f}-{acc.quantile(0.95):.3f}); "
          f"{zoo.info['source']['dropped_checkpoints']} checkpoints left out for non-finite weights")


if __name__ == "__main__":
    common.run(main)
