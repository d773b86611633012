import sys

from gemma_keras.cli import main

sys.exit(main())
