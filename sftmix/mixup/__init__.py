"""Stage 3's regulariser: balanced confident/unconfident pairs (`pairing`) and the Mixup loss on the last hidden
states through the fused head (`loss`, with `sftmix.head`)."""
