"""The streaming side of lum-stream: embedded broker, topic admin, producers and Faust agents."""
