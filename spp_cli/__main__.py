"""`python -m spp_cli ...` (what `accelerate launch -m spp_cli finetune ...` runs on each process)."""

from spp_cli.cli import main

main()
