r"""Convert a llama2.c checkpoint to an HF Flax Llama checkpoint.

  python -m launch.convert_llama2c --bin third_party/stories260k/llama2c/stories260K.bin \
      --tokenizer third_party/stories260k/llama2c/tok512.model --out third_party/stories260k/hf
"""

from absl import flags

from launch import common
from wa.models import llama2c

flags.DEFINE_string("bin", None, "llama2.c legacy checkpoint (.bin).")
flags.DEFINE_string("tokenizer", None, "SentencePiece .model to save beside it.")
flags.DEFINE_string("out", None, "Output directory.")
flags.mark_flags_as_required(["bin", "out"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    print(llama2c.convert(FLAGS.bin, FLAGS.tokenizer, FLAGS.out))


if __name__ == "__main__":
    common.run(main)
