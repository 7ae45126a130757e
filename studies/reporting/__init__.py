"""What a user reads about a study: the progress bar and summary (progress), plotly reports
(plots), and studies side by side (best_so_far)."""
