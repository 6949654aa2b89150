"""One email: its model and checks (`models`) and how addresses are read (`addresses`)."""
