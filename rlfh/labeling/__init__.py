"""People in the loop: the labeling page (``rlfh label``), the labels table beside a rollout log,
pairs from people's labels for training, and human evaluation (``rlfh eval-human``)."""
