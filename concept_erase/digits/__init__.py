"""The embedded digits world: its data and captions, the shipped model and judge, judging generations,
the model card and the demo."""
