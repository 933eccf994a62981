"""mambakit.training: configuration (`config`), data (`data`, `tokenizer`), optimizer groups (`optim`),
checkpoints (`checkpoint`), the loop (`trainer.train`), scale-out (`distributed`) and the commands
(`cli`, `tokenizer_cli`, `plot`). See docs/training.md. Import the submodules you need: this package
imports nothing itself so that `mambakit plot` does not load torch."""
